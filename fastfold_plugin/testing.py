"""Helpers shared by the test suite and the benchmarks.

Comparisons report where the worst mismatch is, not just that two tensors differ.
"""
from typing import Optional

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a = actual.detach().double()
    e = expected.detach().double()
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    if den == 0.0:
        return num
    return num / den


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """One line: relative error, worst absolute error and its index, values there."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    diff = (a - e).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (
        f"rel err {rel_err(actual, expected):.3e}, max abs err {diff.reshape(-1)[flat].item():.3e} "
        f"at {idx}: got {a.reshape(-1)[flat].item():.6g}, expected {e.reshape(-1)[flat].item():.6g}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float = 0.0,
    max_rel: Optional[float] = None,
    name: str = "tensor",
) -> None:
    """Elementwise |a - e| <= atol + rtol * |e| and, if given, norm ratio <= max_rel.

    NaN or inf anywhere in `actual` where `expected` is finite fails.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double()
    e = expected.detach().double()
    if not torch.isfinite(a[torch.isfinite(e)]).all():
        raise AssertionError(f"{name}: non-finite values where the reference is finite; "
                             + describe_mismatch(actual, expected))
    ok = (a - e).abs() <= atol + rtol * e.abs()
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise AssertionError(f"{name}: {bad}/{ok.numel()} elements out of tolerance "
                             f"(rtol {rtol:g}, atol {atol:g}); " + describe_mismatch(actual, expected))
    if max_rel is not None:
        r = rel_err(actual, expected)
        if r > max_rel:
            raise AssertionError(f"{name}: relative error {r:.3e} > {max_rel:.1e}; "
                                 + describe_mismatch(actual, expected))


def randomize_parameters_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Give every parameter fresh, non-zero random values (deterministic for `seed`).

    OpenFold zero-initialises final and gating layers, which would let a do-nothing plugin pass
    equivalence tests; tests randomise first. LayerNorm weights stay near 1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("weight") and p.dim() == 1:  # LayerNorm scales
                r = 1.0 + 0.1 * r
            elif p.dim() >= 2:  # weights: unit-variance outputs for unit-variance inputs
                r = scale * r / p.shape[-1] ** 0.5
            else:  # biases and other vectors
                r = 0.1 * scale * r
            # keep every entry away from exactly zero
            r = torch.where(r.abs() < 1e-6, torch.full_like(r, 1e-3), r)
            p.copy_(r.to(p.dtype))
    return module


SAMPLE_FEATS = "openfold_samples/sample_feats.pickle.gz"


def load_sample_batch(path: str, n_res: int = 16, n_msa: int = 8, n_extra: int = 16,
                      n_templ: int = 2, n_recycle: int = 1):
    """A real processed AlphaFold batch (OpenFold's test sample), cropped for CPU tests.

    `path` is the `sample_feats.pickle.gz` file (a 200-residue protein, recycling dim first).
    Each feature is cropped along its residue, MSA, extra-MSA and template dims (as named by
    OpenFold's feature schema, `config.data.common.feat`) and the recycling dim is moved last,
    as `AlphaFold.forward` expects. Returns a dict of tensors.
    """
    import gzip
    import pickle

    import numpy as np
    from openfold.config import NUM_EXTRA_SEQ, NUM_MSA_SEQ, NUM_RES, NUM_TEMPLATES, model_config
    from openfold.data import data_transforms

    with gzip.open(path, "rb") as f:
        feats = pickle.load(f)
    schema = model_config("model_1_ptm").data.common.feat
    sizes = {NUM_RES: n_res, NUM_MSA_SEQ: n_msa, NUM_EXTRA_SEQ: n_extra, NUM_TEMPLATES: n_templ}
    feats["template_all_atom_mask"] = feats.pop("template_all_atom_masks")
    batch = {}
    for k, v in feats.items():
        v = np.asarray(v)[:n_recycle]
        dims = schema.get(k, [])
        idx = [slice(None)] + [slice(0, sizes[d]) if d in sizes else slice(None) for d in dims]
        v = v[tuple(idx)]
        if k == "seq_length":
            v = np.full_like(v, n_res)
        t = torch.from_numpy(np.ascontiguousarray(v))
        if k in ("aatype", "template_aatype", "extra_msa", "residx_atom37_to_atom14",
                 "residx_atom14_to_atom37", "true_msa", "residue_index"):
            t = t.long()
        batch[k] = t
    batch = data_transforms.atom37_to_torsion_angles("template_")(batch)
    return {k: v.permute(*range(1, v.dim()), 0) if v.dim() > 0 else v for k, v in batch.items()}


def grad_errors(grads: dict, ref_grads: dict, floor_frac: float = 1e-3) -> dict:
    """Relative error of every gradient: ||g - ref|| / max(||ref||, floor).

    The floor (`floor_frac` of the largest reference gradient norm) covers parameters whose exact
    gradient is zero by symmetry, e.g. the bias of the LayerNorm before a pair-bias projection
    (it adds a constant to every logit of a softmax row): their computed gradient is rounding
    noise on both sides, and a plain relative error of noise against noise means nothing.
    """
    norms = {k: torch.linalg.vector_norm(v.double()).item() for k, v in ref_grads.items()}
    floor = floor_frac * max(norms.values())
    return {k: torch.linalg.vector_norm((grads[k] - ref_grads[k]).double()).item()
            / max(norms[k], floor) for k in ref_grads}


def assert_matches_truth(actual: torch.Tensor, expected: torch.Tensor, truth: torch.Tensor,
                         dtype: torch.dtype, tol: float, name: str) -> None:
    """An op's result vs its reference (`expected`, same dtype) and an fp64 `truth`.

    fp32: the op is compared with the truth elementwise, atol from the tensor's scale, the fp32
    reference's own error, or 1e-6 where the truth is zero (e.g. the gradient of a bias constant
    along a softmax row), and the norm ratio is at most `tol` where the scale is not tiny.
    Low precision: the op's relative error is at most `tol` times the reference's own error.
    """
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if dtype == torch.float32:
        scale = truth.detach().abs().max().item()
        ref_err = (expected.detach().double() - truth.detach().double()).abs().max().item()
        atol = max(1e-5 * scale, 4 * ref_err, 1e-6)
        assert_close(actual, truth, rtol=1e-4, atol=atol, max_rel=tol if scale > 1e-4 else None,
                     name=name)
        return
    e_op, e_ref = rel_err(actual, truth), rel_err(expected, truth)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    assert e_op <= tol * e_ref + 1e-6, (
        f"{name}: op error {e_op:.3e} > {tol} x reference error {e_ref:.3e}")
