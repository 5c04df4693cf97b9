"""fastfold-plugin: fused Triton kernels and Dynamic Axial Parallelism for OpenFold.

Importing this package patches nothing::

    import fastfold_plugin
    from openfold.config import model_config
    from openfold.model.model import AlphaFold

    config = model_config("model_1_ptm")
    config.globals.use_fastfold = True      # the flag in the OpenFold config
    fastfold_plugin.register()              # AlphaFold now honours the flag when built
    model = AlphaFold(config)               # accelerated; load OpenFold weights as usual

    handle = fastfold_plugin.enable(other_model)   # or accelerate any OpenFold module tree
    handle.disable()                               # restores the stock forwards exactly
"""
import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("openfold") is None:
    raise ImportError(
        "fastfold_plugin needs OpenFold (PyPI openfold==0.0.1), which is not installed in this "
        "Python. Its PyPI sdist does not install as shipped; from the fastfold-plugin checkout run "
        "`make install` (or `make demo` / `make test`), which builds a fixed copy into .venv. "
        "See docs/install.md."
    )

from fastfold_plugin._api import (  # noqa: E402
    BACKENDS,
    FastFoldHandle,
    check_config,
    disable,
    enable,
    is_enabled,
    is_registered,
    register,
    unregister,
)

__all__ = [
    "BACKENDS",
    "FastFoldHandle",
    "check_config",
    "disable",
    "enable",
    "is_enabled",
    "is_registered",
    "register",
    "unregister",
]
