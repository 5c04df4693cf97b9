#!/usr/bin/env bash
# Fill the wheelhouse for the offline GPU machine: Python 3.12, x86-64 Linux, torch, triton, numpy,
# scipy, matplotlib and pytest in its image, no network. `make install OFFLINE_WHEELHOUSE=DIR`
# there installs from it (requirements/offline-gpu.txt, requirements/nodeps.txt, OpenFold's sdist
# and the wheel holding OpenFold's missing resource file). trifast and cuEquivariance, for the
# benchmarks only, go to a separate DIR-cueq (too big to travel with DIR).
#
# Run on a machine with network, from anywhere, after `make install` (pip reads OpenFold's sdist
# metadata by running its setup.py, which imports torch from .venv):
#     bash tools/prepare_wheelhouse.sh [DIR]          (default .whl; or `make wheelhouse`)
# Wheels are fetched with --no-deps by exact name: only what the image lacks, nothing it has.
# WHEEL_PYTHON=3.11 makes a wheelhouse for a Python 3.11 machine instead (used to test the
# offline install on a CPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:-.whl}
cueq="${dir%/}-cueq"
py=${PY:-.venv/bin/python}
pyver=${WHEEL_PYTHON:-3.12}
max_mb=60

[ -x "$py" ] || { echo "prepare_wheelhouse: $py not found; run 'make install' first" >&2; exit 1; }
mkdir -p "$dir" "$cueq"

plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() {  # get DIR REQUIREMENT...: binary wheels for the target Python, no dependencies
  local d=$1; shift
  "$py" -m pip download -q --disable-pip-version-check --retries 10 --no-deps --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${plat[@]}" -d "$d" "$@"
}

# requirements/offline-gpu.txt and what those packages need beyond the image (pins: cpu.txt).
get "$dir" dm-tree==0.1.10 ml-collections==1.1.0 biopython==1.88 \
  absl-py==2.5.1 attrs==26.1.0 wrapt==2.5.2 PyYAML==6.0.4 \
  psutil==7.2.2 tqdm==4.70.1 packaging==26.4 setuptools==84.2.1 ninja==1.13.2 pytest-timeout==2.4.0

# colossalai ships only an sdist; it is pure Python: build a py3 wheel here.
"$py" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$dir" colossalai==0.5.0

# OpenFold's sdist and the alphafold-colabfold wheel (its stereo_chemical_props.txt), checked by hash.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" patches/openfold_install/install.py --python "$py" --workdir "$work" --download-only "$dir"

# Benchmarks only: trifast and cuEquivariance, with the dependencies the image lacks.
get "$cueq" trifast==0.1.13 platformdirs==4.14.8 opt-einsum==3.4.0 \
  cuequivariance==0.13.0 cuequivariance-torch==0.13.0 \
  cuequivariance-ops-torch-cu13==0.13.0 cuequivariance-ops-cu13==0.13.0

ls -l "$dir" "$cueq"
du -sh "$dir" "$cueq"
size_mb=$(du -sm "$dir" | cut -f1)
if [ "$size_mb" -ge "$max_mb" ]; then
  echo "prepare_wheelhouse: $dir is $size_mb MB, over the $max_mb MB that can travel to the GPU machine" >&2
  exit 1
fi
