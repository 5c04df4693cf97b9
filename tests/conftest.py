"""Fixtures shared by the whole suite."""
import os
from pathlib import Path

import pytest
import torch

# Triton picks interpreter-or-compiled when a kernel module is imported: without a GPU, run the
# Triton kernels through its interpreter whichever test module imports them first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTFOLD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: OpenFold's real sample inputs."""
    if not (SHARED_DATA / "openfold_samples").is_dir():
        raise FileNotFoundError(
            f"{SHARED_DATA}/openfold_samples not found: the model tests read OpenFold's sample "
            f"features from ../shared/data (or set FASTFOLD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_tf32():
    """IEEE fp32 in torch's matmuls and convolutions for the test (stock OpenFold's side of an
    fp32 comparison); the previous settings come back afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
