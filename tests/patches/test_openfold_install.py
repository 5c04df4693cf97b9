"""OpenFold as `make install` builds it with the fixes in patches/openfold_install/.

These check the installed OpenFold: its attention extension (`attn_core_inplace_cuda`, the CPU
implementation on a CPU machine, OpenFold's CUDA kernel built with fixed flags on a GPU machine),
the resource file the sdist lacks, and the numpy 2 / biopython fixes. `openfold.np.relax` is not
checked by import: it needs OpenMM, which fastfold-plugin does not install; the numpy scan below
covers its source.
"""
import hashlib
import re
from importlib import resources
from pathlib import Path

import openfold
import openfold.utils.kernel.attention_core as openfold_attention_core
import pytest
import torch

from fastfold_plugin.patches.openfold_install import install as installer
from fastfold_plugin.patches.openfold_install.nvidia_cc import _parse_arch, get_nvidia_cc
from fastfold_plugin.testing import assert_close, rel_err

# OpenFold's extension module, as OpenFold imports it (after torch).
attn_core_inplace_cuda = openfold_attention_core.attn_core_inplace_cuda
attention_core = openfold_attention_core.attention_core


def _extension_device() -> str:
    """"cpu" for the CPU build of attn_core_inplace_cuda, "cuda" for the CUDA build."""
    try:
        attn_core_inplace_cuda.forward_(torch.zeros(1, 1), 1, 1)
        return "cpu"
    except RuntimeError:
        return "cuda"


EXTENSION_DEVICE = _extension_device()


def _needs_extension_on(device: str) -> None:
    if device != EXTENSION_DEVICE:
        pytest.skip(f"the installed attn_core_inplace_cuda is the {EXTENSION_DEVICE} build")


def _attention_inputs(shape, dtype, device, seed):
    """q, k, v [B, H, Q|K, C], mask bias [B, 1, 1, K] (some keys masked), pair bias [1, H, Q, K]."""
    b, h, n_q, n_k, c = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, c, generator=gen, dtype=torch.float64) / c**0.5
    k = torch.randn(b, h, n_k, c, generator=gen, dtype=torch.float64)
    v = torch.randn(b, h, n_k, c, generator=gen, dtype=torch.float64)
    mask = (torch.rand(b, 1, 1, n_k, generator=gen) > 0.3).double()
    mask[..., 0] = 1.0  # every row keeps at least one key
    mask_bias = 1e9 * (mask - 1.0)
    pair_bias = torch.randn(1, h, n_q, n_k, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(b, h, n_q, c, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, mask_bias, pair_bias)], grad_out.to(device)


def _run(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _torch_attention(q, k, v, bias_1, bias_2):
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + bias_1 + bias_2, dim=-1), v)


NAMES = ("o", "grad_q", "grad_k", "grad_v", "grad_bias_1", "grad_bias_2")
# [B, H, Q, K, C]: one residue, an AF2-like odd size, and Q != K (the CPU build handles any Q, K;
# OpenFold's CUDA kernel assumes Q == K, as all of OpenFold's calls have it, and K <= 1024).
SHAPES = {
    "cpu": [(1, 1, 1, 1, 4), (2, 3, 37, 37, 8), (2, 2, 5, 11, 16)],
    "cuda": [(1, 1, 1, 1, 4), (2, 3, 37, 37, 8), (1, 4, 129, 129, 32)],
}
# float32: (rtol, max_rel) against the float64 reference (the CUDA kernel uses fast-math exp).
# bfloat16: the allowed multiple of plain torch's own bfloat16 error against float64 (the CUDA
# kernel sums d_ov * v in bfloat16: about 1.5x plain torch's error when emulated on CPU).
FP32_TOL = {"cpu": (1e-4, 2e-6), "cuda": (1e-3, 1e-5)}
BF16_FACTOR = {"cpu": 2.0, "cuda": 3.0}
CASES = [
    pytest.param(device, shape, dtype, id=f"{device}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}",
                 marks=[pytest.mark.gpu] if device == "cuda" else [])
    for device in ("cpu", "cuda") for shape in SHAPES[device] for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("device, shape, dtype", CASES)
def test_attention_core_matches_torch(device, shape, dtype):
    """OpenFold's attention_core (in-place softmax kernel) vs softmax(q k^T + b1 + b2) v: output
    and the gradients of q, k, v and both biases."""
    _needs_extension_on(device)
    inputs, grad_out = _attention_inputs(shape, dtype, device, seed=sum(shape))
    expected = _run(_torch_attention, [t.double() for t in inputs], grad_out)
    actual = _run(attention_core, inputs, grad_out)
    if dtype == torch.float32:
        rtol, max_rel = FP32_TOL[device]
        for name, a, e in zip(NAMES, actual, expected):
            assert_close(a, e, rtol=rtol, atol=1e-6 * e.abs().max().item(), max_rel=max_rel, name=name)
    else:
        plain = _run(_torch_attention, inputs, grad_out)
        for name, a, p, e in zip(NAMES, actual, plain, expected):
            assert a.dtype == dtype, name
            err, ref_err = rel_err(a, e), rel_err(p, e)
            assert err <= BF16_FACTOR[device] * max(ref_err, 1e-3), (
                f"{name}: bf16 error {err:.3e} vs plain torch bf16 {ref_err:.3e}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 37), (3, 129)])
def test_extension_forward_is_softmax(rows, cols, dtype, tol):
    """forward_(x, rows, cols): in place, x <- softmax(x) over the last dim, computed in fp32."""
    _needs_extension_on("cpu")
    x = 3 * torch.randn(rows, cols)
    expected = torch.softmax(x.to(dtype).float(), dim=-1)
    y = x.to(dtype)
    attn_core_inplace_cuda.forward_(y, rows, cols)
    assert y.dtype == dtype
    assert_close(y, expected, rtol=tol, atol=tol * 1e-3, name="softmax")


@pytest.mark.parametrize("b, n_q, n_k, c_v", [(1, 1, 1, 1), (3, 37, 37, 5), (2, 4, 9, 3)])
def test_extension_backward_is_softmax_grad(b, n_q, n_k, c_v):
    """backward_(y, d_ov, v, ...): in place, y <- (dy - sum(y * dy)) * y with dy = d_ov @ v^T."""
    _needs_extension_on("cpu")
    y = torch.softmax(torch.randn(b, n_q, n_k, dtype=torch.float64), dim=-1)
    d_ov = torch.randn(b, n_q, c_v, dtype=torch.float64)
    v = torch.randn(b, n_k, c_v, dtype=torch.float64)
    dy = d_ov @ v.transpose(-1, -2)
    expected = (dy - (y * dy).sum(-1, keepdim=True)) * y
    out = y.float()
    attn_core_inplace_cuda.backward_(out, d_ov.float(), v.float(), b * n_q, n_k, c_v)
    assert_close(out, expected, rtol=1e-4, atol=1e-6, max_rel=1e-5, name="d_logits")


def test_extension_rejects_bad_inputs():
    _needs_extension_on("cpu")
    with pytest.raises(RuntimeError, match="contiguous"):
        attn_core_inplace_cuda.forward_(torch.randn(5, 4).t(), 4, 5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        attn_core_inplace_cuda.forward_(torch.randn(2, 3, dtype=torch.float16), 2, 3)
    with pytest.raises(RuntimeError, match="rows \\* cols"):
        attn_core_inplace_cuda.forward_(torch.randn(2, 3), 3, 3)


def test_stereo_chemical_props_installed():
    """The resource the sdist lacks is installed, is the expected file, and OpenFold reads it."""
    path = resources.files("openfold") / "resources" / "stereo_chemical_props.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == installer.RESOURCE_SHA256
    from openfold.np import residue_constants

    bonds, virtual_bonds, angles = residue_constants.load_stereo_chemical_props()
    assert set(residue_constants.restype_1to3.values()) <= set(bonds)
    bounds = residue_constants.make_atom14_dists_bounds()
    assert bounds["lower_bound"].shape == (21, 14, 14)
    assert (bounds["upper_bound"] >= bounds["lower_bound"]).all()
    assert bounds["upper_bound"].max() > 0


def test_no_names_removed_from_numpy_remain():
    """No np.object / np.bool / np.int ... (gone from numpy) anywhere in the installed OpenFold."""
    root = Path(openfold.__file__).parent
    hits = [
        f"{py.relative_to(root)}:{i}: {line.strip()}"
        for py in sorted(root.rglob("*.py"))
        for i, line in enumerate(py.read_text().splitlines(), 1)
        if installer.NUMPY_REMOVED_RE.search(line) or "SCOPData" in line
    ]
    assert not hits, "\n".join(hits)


def test_templates_import_with_numpy_2():
    import openfold.data.templates as templates

    assert templates.TEMPLATE_FEATURES["template_sequence"] is object


def test_mmcif_parsing_reads_a_real_structure(shared_data):
    """mmcif_parsing (its SCOPData lookup now PDBData's) gives PDB 2q2k's chain A sequence."""
    from openfold.data import mmcif_parsing

    text = (shared_data / "openfold_samples" / "mmcifs" / "2q2k.cif").read_text()
    result = mmcif_parsing.parse(file_id="2q2k", mmcif_string=text)
    assert not result.errors, result.errors
    seq = "MGSSHHHHHHSSGLVPGSHMDKKETKHLLKIKKEDYPQIFDFLENVPRGTKTAHIREALRRYIEEIGENP"
    assert result.mmcif_object.chain_to_seqres["A"] == seq


def test_apply_edits_fails_loudly_on_a_different_sdist(tmp_path):
    (tmp_path / "setup.py").write_text("print('not the OpenFold sdist')\n")
    with pytest.raises(installer.InstallError, match="expected 1 occurrence"):
        installer.apply_edits(tmp_path)


def test_apply_edits_catches_a_leftover_numpy_alias(tmp_path):
    edit = installer.Edit("a.py", "x = 1\n", "x = 2\n", "test")
    (tmp_path / "a.py").write_text("x = 1\ny = np.float(3)\n")
    with pytest.raises(installer.InstallError, match=re.escape("a.py:2: y = np.float(3)")):
        installer.apply_edits(tmp_path, edits=[edit])


@pytest.mark.parametrize("entry, cc", [("9.0", (9, 0)), ("9.0a", (9, 0)), ("8.6+PTX", (8, 6)), ("sm90", None)])
def test_parse_arch(entry, cc):
    assert _parse_arch(entry) == cc


def test_get_nvidia_cc_follows_torch(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    cc, reason = get_nvidia_cc()
    if torch.cuda.is_available():
        assert (cc, reason) == (tuple(torch.cuda.get_device_capability(0)), None)
    else:
        assert cc is None and reason
