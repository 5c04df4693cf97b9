"""enable / disable / register: how fastfold-plugin attaches to OpenFold models.

Patching rebinds ``forward`` on the instances of OpenFold's modules inside the tree it is given
(other instances of the same classes stay stock). Parameters, buffers and ``state_dict`` keys are
untouched. The only class-level hook is :func:`register`, which wraps ``AlphaFold.__init__`` so
that models built with ``config.globals.use_fastfold = True`` come out enabled.

Ownership rule for overlapping handles: every patched module belongs to exactly one live handle,
the one that patched it. ``enable`` on a tree that is already (partly) enabled with the same
settings patches only what is not patched yet and leaves the rest to its owner; with different
settings it raises before touching anything. ``disable`` restores exactly the modules its handle
patched, in any order relative to other handles, and is idempotent.
"""
import logging
import os
import types
import weakref
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

logger = logging.getLogger("fastfold_plugin")

BACKENDS = ("auto", "triton", "reference")

_warned = set()


def _log_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def triton_problem() -> Optional[str]:
    """Why Triton kernels cannot run here (None when they can)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not importable ({e}); install the triton version your torch expects"
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return ("no CUDA device is visible and Triton's interpreter is off; run on a CUDA GPU, or set "
            "TRITON_INTERPRET=1 before starting Python to run the Triton kernels on the CPU "
            "through Triton's interpreter (slow: for tests), or use backend='reference'")


class _PatchState:
    """What a patched module needs at call time: its backend and its owner."""

    def __init__(self, backend: str, owner_id: int, dap=None):
        self.backend = backend
        self.owner_id = owner_id
        self.dap = dap

    def ops_for(self, x: torch.Tensor):
        """The op table for a call whose main input is `x`."""
        from fastfold_plugin.kernels import get_ops

        if self.backend != "auto":
            return get_ops(self.backend)
        if x.is_cuda and triton_problem() is None:
            return get_ops("triton")
        if not x.is_cuda:
            _log_once("auto-cpu", "fastfold-plugin: input on the CPU; using the reference ops "
                      "(pass backend='triton' with TRITON_INTERPRET=1 to run the Triton kernels "
                      "through Triton's interpreter)")
        else:
            _log_once("auto-notriton", f"fastfold-plugin: {triton_problem()}; using the reference ops")
        return get_ops("reference")

    def __deepcopy__(self, memo):
        # a deep-copied model keeps the same backend, owner and process group
        return _PatchState(self.backend, self.owner_id, self.dap)

    # The table is looked up per call; ``ops`` serves callers that have no tensor at hand.
    @property
    def ops(self):
        from fastfold_plugin.kernels import get_ops

        return get_ops("reference" if self.backend == "auto" else self.backend)


def _is_openfold_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "openfold"


class FastFoldHandle:
    """The undo for one :func:`enable` call; also a context manager."""

    _next_id = 1

    def __init__(self, backend: str, dap=None):
        self.backend = backend
        self.dap = dap
        self.id = FastFoldHandle._next_id
        FastFoldHandle._next_id += 1
        self._modules: List[weakref.ref] = []

    @property
    def enabled(self) -> bool:
        return any(m() is not None and _owner(m()) == self.id for m in self._modules)

    @property
    def num_patched(self) -> int:
        return sum(1 for m in self._modules if m() is not None and _owner(m()) == self.id)

    def disable(self) -> None:
        """Restore the stock forward of every module this handle patched."""
        for ref in self._modules:
            module = ref()
            if module is None or _owner(module) != self.id:
                continue
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_fastfold_patch", None)
        self._modules = []

    def __enter__(self) -> "FastFoldHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __repr__(self) -> str:
        return f"FastFoldHandle(backend={self.backend!r}, patched={self.num_patched})"


def disable(module: nn.Module) -> int:
    """Restore the stock forward of every patched module in the tree, whichever handle patched
    it (e.g. a model enabled by :func:`register`). Returns how many modules were restored."""
    n = 0
    for m in module.modules():
        if "_fastfold_patch" in m.__dict__:
            m.__dict__.pop("forward", None)
            del m.__dict__["_fastfold_patch"]
            n += 1
    return n


def _owner(module: nn.Module) -> Optional[int]:
    state = module.__dict__.get("_fastfold_patch")
    return None if state is None else state.owner_id


def is_enabled(module: nn.Module) -> bool:
    """True if any module in the tree runs a fastfold-plugin forward."""
    return any("_fastfold_patch" in m.__dict__ for m in module.modules())


def _forward_table(dap) -> Dict[type, Callable]:
    from fastfold_plugin.patches.forwards import FORWARDS

    if dap is None or getattr(dap, "size", 1) == 1:
        return FORWARDS
    from fastfold_plugin.patches.dap import DAP_FORWARDS

    return {**FORWARDS, **DAP_FORWARDS}


def enable(module: nn.Module, backend: str = "auto", dap=None) -> FastFoldHandle:
    """Accelerate an OpenFold module tree in place and return the handle that undoes it.

    Args:
        module: ``AlphaFold`` or any OpenFold submodule (``EvoformerBlock``, ``ExtraMSABlock``,
            ``TemplatePairStackBlock``, ``TriangleAttention``, ...).
        backend: ``"auto"`` (Triton kernels for CUDA inputs, reference ops for CPU inputs, chosen
            per call), ``"triton"`` (always the Triton kernels) or ``"reference"`` (the
            plain-PyTorch ops).
        dap: a DAP context from ``fastfold_plugin.distributed`` to split each protein across a
            process group (None: single process).
    """
    from fastfold_plugin.patches.forwards import replacement_for

    if not isinstance(module, nn.Module):
        raise TypeError(f"fastfold_plugin.enable() expects an OpenFold torch.nn.Module (AlphaFold "
                        f"or one of its submodules); got {type(module).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        problem = triton_problem()
        if problem is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {problem}")
    _check_model_globals(module)
    if dap is not None:
        from fastfold_plugin.distributed import check_context

        g = getattr(module, "globals", None)
        check_context(dap, None if g is None else (g.get("dap_size", None) or None))
    table = _forward_table(dap)

    plan = []
    found_openfold = False
    for m in module.modules():
        found_openfold = found_openfold or _is_openfold_module(m)
        fn = replacement_for(m, table)
        if fn is None:
            continue
        state = m.__dict__.get("_fastfold_patch")
        if state is not None:
            if state.backend != backend or state.dap is not dap:
                raise ValueError(
                    f"{type(m).__name__} in this tree is already enabled with backend "
                    f"{state.backend!r}{' and DAP' if state.dap is not None else ''}; call "
                    f"disable() on that handle before enabling it with other settings")
            continue
        plan.append((m, fn))
    if not found_openfold:
        raise TypeError(f"fastfold_plugin.enable() expects an OpenFold module (AlphaFold or one of "
                        f"its submodules); {type(module).__name__} contains no OpenFold module")

    handle = FastFoldHandle(backend, dap)
    for m, fn in plan:
        m.__dict__["_fastfold_patch"] = _PatchState(backend, handle.id, dap)
        m.__dict__["forward"] = types.MethodType(fn, m)
        handle._modules.append(weakref.ref(m))
    return handle


def _check_model_globals(module: nn.Module) -> None:
    """Reject OpenFold options the plugin does not implement, on an AlphaFold's config."""
    g = getattr(module, "globals", None)
    if g is not None:
        check_config(g)


def check_config(g) -> None:
    """Check `config.globals` for options that conflict with fastfold-plugin.

    OpenFold's own `model_config` has already checked its options; the plugin checks again here
    because its flag is added after that check.
    """
    def get(key, default=None):
        try:
            return g[key]
        except (KeyError, AttributeError):
            return default

    if get("use_flash", False):
        raise ValueError("config.globals.use_fastfold cannot be combined with use_flash: the "
                         "plugin's attention is already flash-style. Set use_flash = False.")
    if get("offload_inference", False):
        raise ValueError("config.globals.use_fastfold does not support offload_inference (set by "
                         "long_sequence_inference=True): set offload_inference = False. For long "
                         "sequences the plugin's fused kernels keep memory low without offloading.")
    backend = get("fastfold_backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"config.globals.fastfold_backend = {backend!r}; choose one of {BACKENDS}")


_original_init = None


def register() -> None:
    """Make ``AlphaFold`` honour ``config.globals.use_fastfold`` for models built from now on.

    Idempotent. Without it, the flag is a documented no-op: OpenFold itself ignores it.
    """
    global _original_init
    from openfold.model.model import AlphaFold

    if _original_init is not None:
        return
    original = AlphaFold.__init__

    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        g = config.globals
        if g.get("use_fastfold", False):
            check_config(g)
            dap = None
            dap_size = g.get("dap_size", 1) or 1
            if dap_size > 1:
                from fastfold_plugin.distributed import dap_context_for

                dap = dap_context_for(dap_size)
            enable(self, backend=g.get("fastfold_backend", "auto"), dap=dap)

    __init__.__wrapped__ = original
    AlphaFold.__init__ = __init__
    _original_init = original


def unregister() -> None:
    """Stop enabling models built from now on; models already built stay as they are."""
    global _original_init
    from openfold.model.model import AlphaFold

    if _original_init is None:
        return
    AlphaFold.__init__ = _original_init
    _original_init = None


def is_registered() -> bool:
    return _original_init is not None
