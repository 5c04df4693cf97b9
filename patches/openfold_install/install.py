#!/usr/bin/env python3
"""Download, fix, build and install OpenFold (PyPI sdist `openfold==0.0.1`) into a Python env.

The sdist does not install as shipped; this script applies the fixes listed in `EDITS`,
`CPU_KERNEL_SOURCE` and `RESOURCE_*` to a fresh copy of it, then runs
`pip install --no-build-isolation --no-deps <fixed copy>` with the target interpreter.
docs/install.md explains every fix. It needs only the standard library (and torch in the target
environment), so it runs before fastfold_plugin is installed:

    python patches/openfold_install/install.py --python .venv/bin/python --workdir .venv/build/openfold
    python patches/openfold_install/install.py ... --no-index --find-links .whl   # offline
    python patches/openfold_install/install.py --download-only .whl               # fill a wheelhouse

Any difference between the sdist and what the fixes expect stops the install with an error.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

HERE = Path(__file__).resolve().parent

OPENFOLD_REQUIREMENT = "openfold==0.0.1"
OPENFOLD_SDIST = "openfold-0.0.1.tar.gz"
OPENFOLD_SDIST_SHA256 = "d709aa2647b9e15fd4da42dfc3dbe9fc7310c42bc01bd0b4f5600eb39edef8f8"

# openfold/resources/stereo_chemical_props.txt is missing from the sdist (its setup.py lists it in
# package_data); the identical file ships inside this wheel.
RESOURCE_REQUIREMENT = "alphafold-colabfold==2.3.27"
RESOURCE_WHEEL_GLOB = "alphafold_colabfold-2.3.27-*.whl"
RESOURCE_MEMBER = "alphafold/common/stereo_chemical_props.txt"
RESOURCE_SHA256 = "24510899eeb49167cffedec8fa45363a4d08279c0c637a403b452f7d0ac09451"
RESOURCE_DEST = "openfold/resources/stereo_chemical_props.txt"

# The CPU variant of OpenFold's attention extension: this file's contents replace the stub.
CPU_KERNEL_SOURCE = HERE / "softmax_cpu.cpp"
CPU_KERNEL_DEST = "openfold/utils/kernel/csrc/softmax_cuda_stub.cpp"
CPU_STUB_MARKER = 'not implemented on CPU");'

SHIM_SOURCE = HERE / "nvidia_cc.py"

PIP_ATTEMPTS = 3


@dataclass(frozen=True)
class Edit:
    """Replace `old` by `new` in `path` (relative to the sdist root); `old` must occur `count` times."""

    path: str
    old: str
    new: str
    why: str
    count: int = 1


EDITS = (
    Edit(
        "setup.py",
        "from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME\n",
        "import torch\nfrom torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME\n",
        "setup.py needs torch.version.cuda for the next fix",
    ),
    Edit(
        "setup.py",
        "if bare_metal_major != -1:\n",
        "if bare_metal_major != -1 and torch.version.cuda is not None:\n",
        "a CPU build of torch with a CUDA toolkit on the machine must build the CPU extension",
    ),
    Edit(
        "setup.py",
        "'-std=c++14',",
        "'-std=c++17',",
        "torch's headers need C++17 or later; nvcc stops at the first C++17 construct",
    ),
    Edit(
        "openfold/data/templates.py",
        '"template_domain_names": np.object,',
        '"template_domain_names": object,',
        "np.object was removed in numpy 1.24 (AttributeError at import)",
    ),
    Edit(
        "openfold/data/templates.py",
        '"template_sequence": np.object,',
        '"template_sequence": object,',
        "np.object was removed in numpy 1.24 (AttributeError at import)",
    ),
    Edit(
        "openfold/np/relax/utils.py",
        "dtype=np.bool)",
        "dtype=np.bool_)",
        "np.bool was removed in numpy 1.24 (numpy 2 brought the name back; np.bool_ works on both)",
    ),
    Edit(
        "openfold/data/mmcif_parsing.py",
        "from Bio.Data import SCOPData\n",
        "from Bio.Data import PDBData\n",
        "Bio.Data.SCOPData was removed from biopython (1.82)",
    ),
    Edit(
        "openfold/data/mmcif_parsing.py",
        'SCOPData.protein_letters_3to1.get(monomer.id, "X")',
        'PDBData.protein_letters_3to1_extended.get(monomer.id, "X")',
        "PDBData.protein_letters_3to1_extended is SCOPData.protein_letters_3to1 under its new name",
    ),
)

# Names removed from numpy (1.24 aliases and numpy 2 removals). After the edits, none may remain
# anywhere in the sdist's Python files.
_REMOVED_NUMPY_NAMES = (
    "int", "float", "bool", "object", "str", "long", "unicode", "complex",
    "float_", "complex_", "string_", "unicode_", "NaN", "NAN", "Inf", "PINF", "NINF", "infty",
    "product", "cumproduct", "alltrue", "sometrue", "asfarray", "round_", "find_common_type",
    "cast", "mat", "msort", "issubclass_", "int0", "uint0", "bool8", "longfloat", "singlecomplex",
    "cfloat", "longcomplex", "clongfloat", "PZERO", "NZERO",
)
NUMPY_REMOVED_RE = re.compile(r"\b(?:np|numpy)\.(%s)\b" % "|".join(_REMOVED_NUMPY_NAMES))


def log(msg: str) -> None:
    print(f"[openfold-install] {msg}", flush=True)


class InstallError(RuntimeError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd: Sequence[str], env: Dict[str, str] = None, cwd: Path = None, capture: bool = False) -> str:
    log("$ " + " ".join(str(c) for c in cmd))
    res = subprocess.run(
        [str(c) for c in cmd], env=env, cwd=cwd, text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    if res.returncode != 0:
        raise InstallError(f"command failed with exit code {res.returncode}: {' '.join(map(str, cmd))}")
    return res.stdout if capture else ""


def run_pip(python: str, args: Sequence[str], env: Dict[str, str], attempts: int = PIP_ATTEMPTS) -> None:
    """`python -m pip ARGS`, retried: downloads from the index can fail transiently."""
    for attempt in range(1, attempts + 1):
        try:
            run([python, "-m", "pip", *args], env=env)
            return
        except InstallError:
            if attempt == attempts:
                raise
            log(f"pip failed (attempt {attempt}/{attempts}); retrying in 10 s")
            time.sleep(10)


def make_shim(root: Path) -> Path:
    """A directory holding `scripts/utils.py` (a copy of nvidia_cc.py) for OpenFold's setup.py."""
    pkg = root / "scripts"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    shutil.copyfile(SHIM_SOURCE, pkg / "utils.py")
    return root


def build_env(python: str, shim: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
    # ninja, when installed in the environment, lets torch's BuildExtension compile in parallel.
    env["PATH"] = os.pathsep.join((str(Path(python).parent), env.get("PATH", "")))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return env


def download(python: str, dest: Path, index_args: List[str], env: Dict[str, str]) -> Dict[str, Path]:
    """Fetch the OpenFold sdist and the wheel with the resource file into `dest`; check both."""
    dest.mkdir(parents=True, exist_ok=True)
    common = ["download", "--no-deps", "--retries", "10", "--disable-pip-version-check", "-d", str(dest)]
    # pip reads an sdist's metadata by running its setup.py, which imports torch and the shim.
    run_pip(python, common + ["--no-build-isolation", "--no-binary", ":all:", *index_args,
                              OPENFOLD_REQUIREMENT], env)
    run_pip(python, common + ["--only-binary", ":all:", *index_args, RESOURCE_REQUIREMENT], env)
    sdist = dest / OPENFOLD_SDIST
    wheels = sorted(dest.glob(RESOURCE_WHEEL_GLOB))
    if not sdist.is_file() or not wheels:
        raise InstallError(f"expected {OPENFOLD_SDIST} and {RESOURCE_WHEEL_GLOB} in {dest}")
    digest = sha256(sdist)
    if digest != OPENFOLD_SDIST_SHA256:
        raise InstallError(
            f"{sdist} has sha256 {digest}, expected {OPENFOLD_SDIST_SHA256}: not the sdist the fixes "
            "in patches/openfold_install/install.py were written for"
        )
    return {"sdist": sdist, "resource_wheel": wheels[-1]}


def extract_sdist(sdist: Path, workdir: Path) -> Path:
    src_parent = workdir / "src"
    if src_parent.exists():
        shutil.rmtree(src_parent)
    src_parent.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(src_parent, filter="data")
        else:
            tar.extractall(src_parent)
    root = src_parent / OPENFOLD_SDIST[: -len(".tar.gz")]
    if not (root / "setup.py").is_file():
        raise InstallError(f"{sdist} did not unpack to {root}/setup.py")
    return root


def apply_edits(root: Path, edits: Sequence[Edit] = EDITS) -> None:
    for e in edits:
        path = root / e.path
        text = path.read_text()
        found = text.count(e.old)
        if found != e.count:
            raise InstallError(
                f"{e.path}: expected {e.count} occurrence(s) of {e.old!r}, found {found}; "
                "the sdist differs from the one these fixes were written for"
            )
        path.write_text(text.replace(e.old, e.new))
        log(f"fixed {e.path}: {e.why}")
    leftovers = []
    for py in sorted(root.rglob("*.py")):
        for lineno, line in enumerate(py.read_text().splitlines(), 1):
            if NUMPY_REMOVED_RE.search(line):
                leftovers.append(f"{py.relative_to(root)}:{lineno}: {line.strip()}")
    if "SCOPData" in "".join(p.read_text() for p in root.rglob("*.py")):
        leftovers.append("a use of Bio.Data.SCOPData remains")
    if leftovers:
        raise InstallError("names removed from numpy/biopython remain:\n  " + "\n  ".join(leftovers))


def install_cpu_kernel(root: Path) -> None:
    stub = root / CPU_KERNEL_DEST
    text = stub.read_text()
    if text.count(CPU_STUB_MARKER) != 2:
        raise InstallError(f"{CPU_KERNEL_DEST} is not OpenFold's throwing stub; the sdist differs")
    shutil.copyfile(CPU_KERNEL_SOURCE, stub)
    log(f"replaced {CPU_KERNEL_DEST} with {CPU_KERNEL_SOURCE.name} (CPU forward_/backward_)")


def add_resource(root: Path, wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(RESOURCE_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != RESOURCE_SHA256:
        raise InstallError(f"{wheel}:{RESOURCE_MEMBER} has sha256 {digest}, expected {RESOURCE_SHA256}")
    dest = root / RESOURCE_DEST
    dest.write_bytes(data)
    log(f"added {RESOURCE_DEST} from {wheel.name}")


PROBE = r"""
import json, torch
from torch.utils.cpp_extension import CUDA_HOME
from scripts.utils import get_nvidia_cc
cc, reason = get_nvidia_cc()
print(json.dumps({"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_home": CUDA_HOME,
                  "gpu": torch.cuda.is_available(), "cc": cc, "cc_reason": reason}))
"""

VERIFY = r"""
import hashlib, json, os, sys
import torch  # before the extension, which links against torch's libraries
import attn_core_inplace_cuda
from importlib import resources
import openfold
from openfold.utils.kernel.attention_core import attention_core
import openfold.data.templates, openfold.data.mmcif_parsing
from openfold.np import residue_constants
data = (resources.files("openfold") / "resources" / "stereo_chemical_props.txt").read_bytes()
residue_constants.load_stereo_chemical_props()
out = {"openfold": os.path.dirname(openfold.__file__), "extension": attn_core_inplace_cuda.__file__,
       "resource_sha256": hashlib.sha256(data).hexdigest()}
device = sys.argv[1]
if device != "none":
    x = torch.randn(6, 37, device=device)
    ref = torch.softmax(x, -1)
    attn_core_inplace_cuda.forward_(x, 6, 37)
    out["softmax_max_err"] = (x - ref).abs().max().item()
print(json.dumps(out))
"""


def probe(python: str, env: Dict[str, str]) -> dict:
    out = run([python, "-c", PROBE], env=env, capture=True)
    return json.loads(out.strip().splitlines()[-1])


def verify(python: str, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:  # outside the source tree
        out = run([python, "-c", VERIFY, device], cwd=Path(tmp), capture=True)
    info = json.loads(out.strip().splitlines()[-1])
    if info["resource_sha256"] != RESOURCE_SHA256:
        raise InstallError(f"installed stereo_chemical_props.txt differs: {info}")
    if device != "none" and not info["softmax_max_err"] < 1e-5:
        raise InstallError(f"attn_core_inplace_cuda.forward_ gives wrong results on {device}: {info}")
    return info


def main(argv: Sequence[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter of the target environment")
    ap.add_argument("--workdir", default=".venv/build/openfold", help="downloads and the fixed copy")
    ap.add_argument("--find-links", help="a wheelhouse holding the sdist and the resource wheel")
    ap.add_argument("--no-index", action="store_true", help="do not use the package index")
    ap.add_argument("--download-only", metavar="DIR", help="only download both files into DIR")
    args = ap.parse_args(argv)

    python = str(Path(args.python).absolute())
    index_args = (["--no-index"] if args.no_index else []) + (
        ["--find-links", str(Path(args.find_links).resolve())] if args.find_links else [])
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        env = build_env(python, make_shim(workdir / "shim"))
        if args.download_only:
            files = download(python, Path(args.download_only).resolve(), index_args, env)
            log("downloaded " + ", ".join(str(p) for p in files.values()))
            return 0
        t0 = time.time()
        files = download(python, workdir / "downloads", index_args, env)
        root = extract_sdist(files["sdist"], workdir)
        apply_edits(root)
        install_cpu_kernel(root)
        add_resource(root, files["resource_wheel"])

        info = probe(python, env)
        cuda_build = info["torch_cuda"] is not None and info["cuda_home"] is not None
        log(f"torch {info['torch']}, CUDA toolkit {info['cuda_home']}: building the "
            + (f"CUDA extension for compute capability {info['cc']}" if cuda_build else "CPU extension"))
        if cuda_build and info["cc"] is None:
            raise InstallError(f"CUDA build, but no compute capability to build for: {info['cc_reason']}")

        run_pip(python, ["install", "--no-build-isolation", "--no-deps", "--force-reinstall",
                         "--disable-pip-version-check", *index_args, str(root)], env, attempts=1)
        device = ("cuda" if info["gpu"] else "none") if cuda_build else "cpu"
        result = verify(python, device)
        log(f"installed OpenFold into {result['openfold']} with {Path(result['extension']).name} "
            f"in {time.time() - t0:.0f} s" + ("" if device != "none" else " (no GPU here to try the kernel)"))
        return 0
    except InstallError as exc:
        log(f"ERROR: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
