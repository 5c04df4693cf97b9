"""What the sharded block's training step launches besides its maths: no full-size slice whose
gradient autograd would build by zero-filling a tensor and copying into it (the sharded forwards
used to take such a slice of every unchunked input; ``benchmarks/census_dap_ops.py`` lists
every op of a step by call site); and no axis switch of the pair tensor z (only the MSA
switches). One process, a DAP context of size 1, the reference ops: the sharded code path
without collectives."""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastfold_plugin.distributed as fd
from fastfold_plugin.kernels import get_ops
from fastfold_plugin.patches.dap import _enter_msa, _msa_block_sharded, _Run
from fastfold_plugin.testing import randomize_parameters_


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _block():
    from openfold.model.evoformer import EvoformerBlock

    block = EvoformerBlock(c_m=16, c_z=8, c_hidden_msa_att=4, c_hidden_opm=4, c_hidden_mul=8,
                           c_hidden_pair_att=4, no_heads_msa=2, no_heads_pair=2, transition_n=2,
                           msa_dropout=0.15, pair_dropout=0.25, inf=1e9, eps=1e-10)
    return randomize_parameters_(block, seed=0).train()


def _step_ops(chunk_size, switches=None, dtype=None):
    g = torch.Generator().manual_seed(0)
    n_seq, n_res = 5, 7
    m = torch.randn(n_seq, n_res, 16, generator=g)
    z = torch.randn(n_res, n_res, 8, generator=g)
    block = _block()
    run = _Run(fd.DAPContext(), get_ops("reference"), n_res, n_seq, chunk_size,
               inplace_safe=False, mask_trans=True)
    with torch.no_grad():
        shards = _enter_msa(run, m, z, torch.ones(n_seq, n_res), torch.ones(n_res, n_res))
    for t in shards:
        t.requires_grad_()
    if switches is not None:  # record what the block's synchronous switches move
        def recorder(name):
            fn = getattr(run, name)

            def record(x):
                switches.append((name, x.shape[-1], x.dtype))
                return fn(x)
            return record

        run.to_cols = recorder("to_cols")
        run.col_to_row = recorder("col_to_row")  # (async: the MSA back to rows for the next block)
    counter = _OpCounter()
    with counter, torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        sum(o.float().sum() for o in _msa_block_sharded(block, run, *shards)).backward()
    assert all(p.grad is not None for p in block.parameters())
    return counter.ops


def test_sharded_training_step_takes_no_full_size_slices():
    ops = _step_ops(chunk_size=None)
    assert ops["slice_backward"] == 0, dict(ops)


def test_chunked_training_step_still_slices_its_chunks():
    # the same code path with chunks: each chunk is a slice, and its gradient is built so
    assert _step_ops(chunk_size=2)["slice_backward"] > 0


def test_pair_tensor_never_switches_axis_in_training():
    """z stays in rows through the training block (the incoming triangle multiplication and the
    ending-node attention run on the row shard): the block's whole-tensor switches are the
    MSA's, to columns and back."""
    switches = []
    _step_ops(chunk_size=None, switches=switches)
    f32 = torch.float32
    assert switches == [("to_cols", 16, f32), ("col_to_row", 16, f32)], switches  # (C_m 16; C_z 8)


def test_msa_switches_to_columns_only_the_row_attention_update():
    """The block gets m in rows and in columns: what switches to columns within the block is the
    row attention's update in the autocast dtype (bf16: half the bytes of the fp32 MSA), added
    to the columns; the fp32 MSA goes back to rows (async) for the next block's row attention."""
    switches = []
    _step_ops(chunk_size=None, switches=switches, dtype=torch.bfloat16)
    assert switches == [("to_cols", 16, torch.bfloat16), ("col_to_row", 16, torch.float32)], \
        switches


def test_in_place_inference_keeps_the_msa_switch_on_nccl(monkeypatch):
    """OpenFold's in-place inference switches the MSA back to rows without the copy engines
    (their slot would hold one more MSA shard of symmetric memory for the whole run); training
    takes them."""
    import types

    from fastfold_plugin.patches import dap

    calls = []
    monkeypatch.setattr(fd, "col_to_row_start",
                        lambda x, group, copy_engine=True: calls.append(copy_engine))
    ctx = types.SimpleNamespace(group=object(), size=2, rank=0, async_comm=True, timeout=None)
    x = torch.zeros(4, 3, 2)
    for inplace_safe, grad in ((True, False), (False, True), (False, False)):
        run = dap._Run(ctx, get_ops("reference"), 6, 4, None, inplace_safe=inplace_safe,
                       mask_trans=True)
        with torch.set_grad_enabled(grad):
            run.col_to_row(x)
    assert calls == [False, True, True]
