"""The fixes OpenFold's PyPI sdist (`openfold==0.0.1`) needs to install and run.

`install.py` downloads the sdist, applies the fixes to a copy and builds it; `make install` runs it
as a plain script (`python patches/openfold_install/install.py`), before fastfold_plugin itself is
installed. `nvidia_cc.py` stands in for the `scripts.utils` module OpenFold's setup.py imports;
`softmax_cpu.cpp` is the CPU implementation of OpenFold's `attn_core_inplace_cuda` extension.
docs/install.md lists every fix and why. Nothing here is imported by the plugin at run time.
"""
