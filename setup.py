"""fastfold-plugin: fused Triton kernels and Dynamic Axial Parallelism for OpenFold.

`kernels/` and `patches/` are installed as `fastfold_plugin.kernels` and
`fastfold_plugin.patches`: no top-level `kernels` or `patches` package lands in site-packages.
OpenFold itself is not a pip requirement here, because its PyPI sdist does not install as
shipped; `make install` builds a fixed copy of it with patches/openfold_install/install.py
(see docs/install.md).
"""
from setuptools import setup

setup(
    name="fastfold-plugin",
    version="0.1.0",
    description="Fused Triton kernels and Dynamic Axial Parallelism for OpenFold",
    packages=[
        "fastfold_plugin",
        "fastfold_plugin.distributed",
        "fastfold_plugin.kernels",
        "fastfold_plugin.patches",
        "fastfold_plugin.patches.openfold_install",
    ],
    package_dir={
        "fastfold_plugin": "fastfold_plugin",
        "fastfold_plugin.kernels": "kernels",
        "fastfold_plugin.patches": "patches",
    },
    package_data={"fastfold_plugin": ["data/*.fasta"], "fastfold_plugin.patches.openfold_install": ["*.cpp"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "dm-tree", "ml-collections", "tqdm"],
    entry_points={"console_scripts": ["fastfold-plugin=fastfold_plugin.cli:main"]},
)
