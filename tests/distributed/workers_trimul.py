"""Worker processes for the sharded triangle multiplication: ``python workers_trimul.py
<scenario> <json args>``, started by ``conftest.launch(..., script=...)`` with torchrun's
environment variables.

Each scenario raises on the first mismatch and prints ``RESULT {json}`` lines. Without a GPU the
Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before they are imported).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the launcher, registry, result lines and stack helpers of the other DAP scenarios
from workers import (  # noqa: E402
    bind_dap,
    compare_runs,
    evoformer_stack,
    main,
    msa_inputs,
    result,
    run_and_grads,
    scenario,
)

import fastfold_plugin.distributed as fd  # noqa: E402
from fastfold_plugin.kernels import get_ops  # noqa: E402
from fastfold_plugin.kernels import triangle_multiplication as trimul_module  # noqa: E402
from fastfold_plugin.kernels.triangle_multiplication import TriMulWeights  # noqa: E402
from fastfold_plugin.testing import assert_close, rel_err  # noqa: E402


def inputs(batch, n, c_z, c_h, seed):
    """The same z, mask (zeros, a fully masked residue), weights and upstream gradient on every
    rank."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(*batch, n, n, c_z, generator=gen) * 2.0 + 0.5
    mask = (torch.rand(*batch, n, n, generator=gen) > 0.25).float()
    if n > 2:
        mask[..., 1, :] = 0.0
        mask[..., :, 1] = 0.0

    def mat(o, i):
        return torch.randn(o, i, generator=gen) / i ** 0.5

    def vec(k, around=0.0):
        return around + 0.1 * torch.randn(k, generator=gen)

    w = TriMulWeights(
        vec(c_z, 1.0), vec(c_z), mat(c_h, c_z), vec(c_h), mat(c_h, c_z), vec(c_h),
        mat(c_h, c_z), vec(c_h), mat(c_h, c_z), vec(c_h), vec(c_h, 1.0), vec(c_h),
        mat(c_z, c_h), vec(c_z), mat(c_z, c_z), vec(c_z))
    g = torch.randn(*batch, n, n, c_z, generator=gen)
    return z, mask, w, g


def device() -> torch.device:
    """This rank's GPU (NCCL groups), or the CPU (gloo, Triton interpreter)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def autocast(dev, dtype):
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)


def single_process(op, z, mask, w, g, outgoing, ac=None):
    """(out, dz, weight grads) of the whole-tensor op in this process."""
    leaves = [t.clone().requires_grad_() for t in (z, *w)]
    with autocast(z.device, ac):
        out = op(leaves[0], mask, TriMulWeights(*leaves[1:]), outgoing)
    grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
    return out.detach(), grads[0], list(grads[1:])


def sharded(op, ctx, z, mask, w, g, outgoing, overlap, ac=None, shard=None, grad=True):
    """(out, dz, weight grads) of the sharded op as the DAP forwards call it: N_res padded to a
    multiple of P with mask 0 (padded z holds garbage), this rank's rows (outgoing, or `shard`
    "rows") or columns (incoming), the weights wrapped in ``sum_grads`` (the DAP reduction),
    outputs and dz gathered and unpadded. `grad` False: the forward under no_grad, (out,)."""
    p, rank, group = ctx.size, ctx.rank, ctx.group
    n = z.shape[-2]
    n_p = fd.padded_length(n, p)
    r = n_p // p
    zp = fd.pad_to(z, {-3: n_p, -2: n_p})
    if n_p > n:
        junk = torch.randn(zp.shape, generator=torch.Generator().manual_seed(99)).to(zp.device)
        real = torch.zeros_like(zp, dtype=torch.bool)
        real[..., :n, :n, :] = True
        zp = torch.where(real, zp, junk)  # the same garbage on every rank
    mp = fd.pad_to(mask, {-2: n_p, -1: n_p})
    gp = fd.pad_to(g, {-3: n_p, -2: n_p})  # zero upstream gradient at padded pairs, as in DAP
    dim = -3 if outgoing or shard == "rows" else -2
    unpad = {-3: n, -2: n}
    if not grad:
        with torch.no_grad(), autocast(z.device, ac):
            out_r = op(zp.narrow(dim, rank * r, r).contiguous(), mp.narrow(dim + 1, rank * r, r),
                       TriMulWeights(*w), outgoing, 1e-5, group, overlap=overlap, shard=shard)
        return (fd.unpad(fd.gather(out_r, dim, group), unpad),)
    z_r = zp.narrow(dim, rank * r, r).contiguous().requires_grad_()
    m_r = mp.narrow(dim + 1, rank * r, r)
    leaves = [t.clone().requires_grad_() for t in w]
    synced = fd.sum_grads(leaves, group)
    with autocast(z.device, ac):
        out_r = op(z_r, m_r, TriMulWeights(*synced), outgoing, 1e-5, group, overlap=overlap,
                   shard=shard)
    assert out_r.shape == z_r.shape, (out_r.shape, z_r.shape)
    grads = torch.autograd.grad(out_r, [z_r] + leaves, gp.narrow(dim, rank * r, r).to(out_r.dtype))
    out = fd.unpad(fd.gather(out_r.detach(), dim, group), unpad)
    dz = fd.unpad(fd.gather(grads[0], dim, group), unpad)
    return out, dz, list(grads[1:])


def check(tag, got, exp):
    """fp32: elementwise within 1e-4 of the value (atol 1e-5 of the tensor's largest entry)."""
    scale = exp.abs().max().item()
    assert_close(got, exp, rtol=1e-4, atol=1e-5 * scale + 1e-30, max_rel=1e-5, name=tag)


def inference_paths(ctx, z, mask, w, g, outgoing, shard, exp_out, tag):
    """The forward-only sharded op (the operand all-gathered a channel chunk at a time; three
    channels a chunk here, so both alternating buffers are reused) equals the full op; with
    overlap off, and on GPUs with NCCL's all-gathers instead of the copy engines' (which must
    have run), bit-identical."""
    op = get_ops("triton").triangle_multiplication_sharded
    p = ctx.size
    n_p = fd.padded_length(z.shape[-2], p)
    saved = trimul_module._GATHER_CHUNK_BYTES
    trimul_module._GATHER_CHUNK_BYTES = 3 * p * (n_p // p) * n_p * 4
    try:
        on, = sharded(op, ctx, z, mask, w, g, outgoing, True, shard=shard, grad=False)
        check(f"{tag} inference out", on, exp_out)
        off, = sharded(op, ctx, z, mask, w, g, outgoing, False, shard=shard, grad=False)
        assert torch.equal(on, off), f"{tag} inference: overlap on/off differ"
        if z.is_cuda:
            assert any(s is not None for s in trimul_module._PeerSlots._made.values()), \
                f"{tag}: the copy-engine all-gathers did not run (symmetric memory unavailable)"
            trimul_module._COPY_ENGINE = False
            try:
                nccl, = sharded(op, ctx, z, mask, w, g, outgoing, True, shard=shard, grad=False)
            finally:
                trimul_module._COPY_ENGINE = True
            assert torch.equal(on, nccl), f"{tag} inference: copy engines and NCCL differ"
    finally:
        trimul_module._GATHER_CHUNK_BYTES = saved


@scenario
def sharded_trimul(args):
    """For each case (N_res, batch dims, c_z, c_hidden, dtype) and direction (incoming: on a
    column shard and on a row shard): the Triton sharded op on this group equals the
    single-process fused op (output, dz and all 16 weight gradients after the DAP reduction,
    fp32), with and without overlap (bit-identical); and the reference sharded op equals the
    single-process reference. bf16 cases (autocast): the sharded op's error against the fp32
    reference is at most twice the single-process op's."""
    dev = device()
    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=120)
    names = ("z",) + TriMulWeights._fields
    tri, ref = get_ops("triton"), get_ops("reference")
    for i, case in enumerate(args["cases"]):
        z, mask, w, g = [x.to(dev) if isinstance(x, torch.Tensor) else TriMulWeights(*[t.to(dev) for t in x])
                         for x in inputs(tuple(case["batch"]), case["n_res"], case["c_z"], case["c_h"], 10 + i)]
        for outgoing in (True, False):
            tag = f"{case} {'outgoing' if outgoing else 'incoming'}"
            if case.get("dtype", "fp32") == "bf16":
                truth = single_process(ref.triangle_multiplication, z, mask, w, g, outgoing)
                one = single_process(tri.triangle_multiplication, z, mask, w, g, outgoing,
                                     torch.bfloat16)
                for shard in (None, "rows") if not outgoing else (None,):
                    got = sharded(tri.triangle_multiplication_sharded, ctx, z, mask, w, g,
                                  outgoing, True, torch.bfloat16, shard=shard)
                    for nm, a, o, t in zip(("out",) + names, [got[0], got[1]] + got[2],
                                           [one[0], one[1]] + one[2],
                                           [truth[0], truth[1]] + truth[2], strict=True):
                        assert a.dtype == o.dtype, f"{tag} {shard} bf16 {nm}: dtype {a.dtype} vs {o.dtype}"
                        e_got, e_one = rel_err(a, t), rel_err(o, t)
                        assert e_got <= 2.0 * e_one + 1e-6, \
                            f"{tag} {shard} bf16 {nm}: sharded error {e_got:.2e} vs one " \
                            f"process {e_one:.2e}"
                continue
            for name, ops in (("triton", tri), ("reference", ref)):
                exp = single_process(ops.triangle_multiplication, z, mask, w, g, outgoing)
                got = sharded(ops.triangle_multiplication_sharded, ctx, z, mask, w, g, outgoing,
                              overlap=True)
                check(f"{tag} {name} out", got[0], exp[0])
                for nm, a, e in zip(names, [got[1]] + got[2], [exp[1]] + exp[2], strict=True):
                    check(f"{tag} {name} d{nm}", a, e)
                if name == "triton":
                    sync = sharded(ops.triangle_multiplication_sharded, ctx, z, mask, w, g,
                                   outgoing, overlap=False)
                    for a, b in zip([got[0], got[1]] + got[2], [sync[0], sync[1]] + sync[2],
                                    strict=True):
                        assert torch.equal(a, b), f"{tag}: overlap on/off differ"
                    inference_paths(ctx, z, mask, w, g, outgoing, None, exp[0], f"{tag} triton")
                if outgoing:
                    continue
                # the incoming update on row shards (the DAP blocks' choice): every gradient;
                # Triton: with overlap on and off (bit-identical) and the forward-only path
                rows = sharded(ops.triangle_multiplication_sharded, ctx, z, mask, w, g,
                               False, True, shard="rows")
                check(f"{tag} {name} rows out", rows[0], exp[0])
                for nm, a, e in zip(names, [rows[1]] + rows[2], [exp[1]] + exp[2], strict=True):
                    check(f"{tag} {name} rows d{nm}", a, e)
                if name == "triton":
                    sync = sharded(ops.triangle_multiplication_sharded, ctx, z, mask, w, g,
                                   False, False, shard="rows")
                    for a, b in zip([rows[0], rows[1]] + rows[2], [sync[0], sync[1]] + sync[2],
                                    strict=True):
                        assert torch.equal(a, b), f"{tag} rows: overlap on/off differ"
                    inference_paths(ctx, z, mask, w, g, False, "rows", exp[0],
                                    f"{tag} triton rows")
        result(ok=True, size=ctx.size, **case)
    fd.shutdown()


class TritonTriMulOps:
    """The reference op table with the Triton ``triangle_multiplication_sharded``: the DAP
    forwards' wiring of the fused op (weights, masks, layouts, gradient reduction) is checked
    without running every other op through the interpreter. Records the trimul's shard shapes."""

    def __init__(self):
        self._ref, self._tri = get_ops("reference"), get_ops("triton")
        self.shapes = []
        self.inference = []  # the `inference` each trimul / outer-product-rows call was given

    def triangle_multiplication_sharded(self, z, *args, **kwargs):
        self.shapes.append(tuple(z.shape))
        self.inference.append(kwargs.get("inference"))
        return self._tri.triangle_multiplication_sharded(z, *args, **kwargs)

    def outer_product_mean_rows(self, *args, **kwargs):
        self.inference.append(kwargs.get("inference"))
        return self._tri.outer_product_mean_rows(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._ref, name)


@scenario
def stacks_triton_trimul(args):
    """An Evoformer stack (activation checkpoints per block) and a template pair stack (2 blocks
    each, training mode, no dropout) under DAP with the Triton sharded triangle multiplication
    equal stock OpenFold in one process: outputs, every parameter gradient (after the DAP
    reduction) and the input gradients (fp32). Every forward-only kernel choice was declined
    explicitly (inference=False), in the checkpoints' gradient-free first passes too."""
    import copy

    from openfold.model.template import TemplatePairStack

    from fastfold_plugin.testing import randomize_parameters_

    ctx = fd.init(dap_size=int(os.environ["WORLD_SIZE"]), timeout=60)
    n_res, n_seq = args["n_res"], args["n_seq"]
    gen = torch.Generator().manual_seed(3)
    m, z, msa_mask, pair_mask = msa_inputs(n_seq, n_res, 16, 8, seed=3)
    evo = evoformer_stack(blocks_per_ckpt=1, dropout=(0.0, 0.0), seed=5)
    templ = randomize_parameters_(TemplatePairStack(
        c_t=8, c_hidden_tri_att=4, c_hidden_tri_mul=8, no_blocks=2, no_heads=2,
        pair_transition_n=2, dropout_rate=0.0, blocks_per_ckpt=None, inf=1e9), seed=6)
    t = torch.randn(2, n_res, n_res, 8, generator=gen)

    def evo_call(mod):
        return lambda m, z, mm, pm: mod(m, z, msa_mask=mm, pair_mask=pm, chunk_size=None)

    def templ_call(mod):
        return lambda t, mask: mod(t, mask, chunk_size=None)

    cases = [("evoformer", evo, evo_call, [m, z, msa_mask, pair_mask], 2,
              [(n_seq, n_res, 16), (n_res, n_res, 8), (n_res, 12)]),
             ("template", templ, templ_call, [t, pair_mask.unsqueeze(-3)], 1, [tuple(t.shape)])]
    for tag, stock, call, ins, n_grad, w_shapes in cases:
        ws = [torch.randn(sh, generator=gen) for sh in w_shapes]
        stock.train()
        dap = copy.deepcopy(stock)
        ops = TritonTriMulOps()
        bind_dap(dap, ctx, ops)
        exp = run_and_grads(stock, call(stock), ins, ws, n_grad)
        got = run_and_grads(dap, call(dap), ins, ws, n_grad)
        r = fd.padded_length(n_res, ctx.size) // ctx.size
        assert ops.shapes and all(r in sh[-3:-1] for sh in ops.shapes), ops.shapes
        assert ops.inference and all(f is False for f in ops.inference), ops.inference
        compare_runs(tag, got, exp)
        result(ok=True, size=ctx.size, stack=tag, trimul_calls=len(ops.shapes))
    fd.shutdown()


if __name__ == "__main__":
    main()
