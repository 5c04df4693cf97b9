"""Benchmark: one whole EvoformerBlock (AF2 model_1_ptm sizes), stock OpenFold vs the plugin.

Measured as the anchors in ANCHORS.md were: random inputs and random weights; training cases in
train mode with OpenFold's dropout under bf16 autocast, one step = forward + backward of
``m.sum() + z.sum()``; inference cases in eval mode under ``no_grad`` and bf16 autocast
(OpenFold's in-place path). Median of ``triton.testing.do_bench``; peak memory of one step.

Providers:
    openfold          the stock block
    openfold_compile  ``torch.compile`` of the stock block (training cases only, ``--full``)
    plugin            the same block after ``fastfold_plugin.enable(block, backend="triton")``
    *_cudagraph       training cases on a GPU: the block's fwd and bwd captured in CUDA graphs
                      (``torch.cuda.make_graphed_callables``), i.e. without host launch overhead;
                      a block that cannot be captured records the error
    *_captured        training cases on a GPU: the whole step (forward, loss, backward writing
                      every gradient, from no gradients) captured in one CUDA graph
                      (``bench_dap.captured_step``, as ``profile_block_step.py`` times it), here
                      timed by ``do_bench`` with its L2 flushes

    python benchmarks/bench_evoformer_block.py [--quick | --full | --dry-run] [--out DIR]

--quick: train 128 x 256, train 512 x 384, inference 128 x 1024 and 128 x 2048 (stock OpenFold
runs out of memory unchunked at 2048: it is run with chunk_size 4 in --full only, about 2 s a
call). --full adds torch.compile and the chunked stock baseline.
"""
import copy

import harness
import torch


def cases(args):
    if args.dry_run:
        return [dict(case="train", n_seq=3, n_res=8), dict(case="infer", n_seq=3, n_res=9)]
    rows = [dict(case="train", n_seq=128, n_res=256), dict(case="train", n_seq=512, n_res=384),
            dict(case="infer", n_seq=128, n_res=1024), dict(case="infer", n_seq=128, n_res=2048)]
    return rows


def make_block(device, dry_run):
    from openfold.config import model_config
    from openfold.model.evoformer import EvoformerBlock

    from fastfold_plugin.testing import randomize_parameters_

    ec = model_config("model_1_ptm", train=True).model.evoformer_stack
    kw = dict(c_m=ec.c_m, c_z=ec.c_z, c_hidden_msa_att=ec.c_hidden_msa_att,
              c_hidden_opm=ec.c_hidden_opm, c_hidden_mul=ec.c_hidden_mul,
              c_hidden_pair_att=ec.c_hidden_pair_att, no_heads_msa=ec.no_heads_msa,
              no_heads_pair=ec.no_heads_pair, transition_n=ec.transition_n,
              msa_dropout=ec.msa_dropout, pair_dropout=ec.pair_dropout, inf=ec.inf, eps=ec.eps)
    if dry_run:
        kw.update(c_m=16, c_z=8, c_hidden_msa_att=8, c_hidden_opm=4, c_hidden_mul=8,
                  c_hidden_pair_att=8, no_heads_msa=2, no_heads_pair=2)
    return randomize_parameters_(EvoformerBlock(**kw), seed=0).to(device), kw


class _Positional(torch.nn.Module):
    """block(m, z, msa_mask, pair_mask) with positional tensors only, as
    ``torch.cuda.make_graphed_callables`` needs."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, m, z, msa_mask, pair_mask):
        return self.block(m, z, msa_mask, pair_mask)


def graphed_step_fn(block, kw, p, device):
    """The training step with the block's forward and backward captured in CUDA graphs
    (``torch.cuda.make_graphed_callables``; dropout draws fresh masks on every replay): what the
    step costs once the host no longer launches each kernel. Autotuning runs in its warm-up."""
    inner = step_fn(block, kw, p, device)  # sets the mode, builds the inputs
    m, z, mm, pm = inner.inputs
    # autocast's weight-cast cache must be off around captured graphs (torch's documented rule)
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(_Positional(block), (m, z, mm, pm))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
            mo, zo = graphed(m, z, mm, pm)
        (mo.float().sum() + zo.float().sum()).backward()
    return step


def captured_step_fn(block, kw, p, device):
    """The whole training step captured in one CUDA graph (``bench_dap.captured_step``): a
    replay is one launch, and the step starts from no gradients, as a training step does."""
    import bench_dap

    inner = step_fn(block, kw, p, device)  # sets the mode, builds the inputs
    m, z, mm, pm = inner.inputs
    return bench_dap.captured_step(lambda mi, zi: block(mi, zi, mm, pm), (m, z),
                                   bench_dap.parse_args(["--dtype", "bf16"]), device,
                                   block.parameters())


def step_fn(block, kw, p, device, chunk_size=None):
    train = p["case"] == "train"
    block.train(train)
    g = torch.Generator().manual_seed(1)
    m = torch.randn(1, p["n_seq"], p["n_res"], kw["c_m"], generator=g).to(device)
    z = torch.randn(1, p["n_res"], p["n_res"], kw["c_z"], generator=g).to(device)
    mm = torch.ones(1, p["n_seq"], p["n_res"], device=device)
    pm = torch.ones(1, p["n_res"], p["n_res"], device=device)
    if train:
        m.requires_grad_()
        z.requires_grad_()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if train:
                mo, zo = block(m, z, mm, pm, chunk_size=chunk_size)
                (mo.float().sum() + zo.float().sum()).backward()
            else:
                with torch.no_grad():
                    # the in-place path writes into its inputs: give it fresh copies
                    block(m.clone(), z.clone(), mm, pm, chunk_size=chunk_size)
    step.inputs = (m, z, mm, pm)
    return step


def timed(step, device, args):
    import triton.testing

    step()  # compile / autotune
    if device.type != "cuda":
        import time
        t = time.perf_counter()
        step()
        ms = (time.perf_counter() - t) * 1e3
        return dict(ms=ms, ms_p20=ms, ms_p80=ms)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms, p20, p80 = triton.testing.do_bench(step, warmup=args.warmup, rep=args.rep,
                                           quantiles=[0.5, 0.2, 0.8])
    return dict(ms=ms, ms_p20=p20, ms_p80=p80, peak_mib=peak)


def main(argv=None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    device = harness.setup_device(args)
    rec = harness.Recorder("evoformer_block", args, device)
    import fastfold_plugin

    stock, kw = make_block(device, args.dry_run)
    plugin = copy.deepcopy(stock)
    fastfold_plugin.enable(plugin, backend="triton")
    for p in cases(args):
        providers = [("openfold", stock, None), ("plugin", plugin, None)]
        if args.full and p["case"] == "train":
            providers.append(("openfold_compile", torch.compile(stock), None))
        if args.full and p["n_res"] >= 2048:
            providers.append(("openfold_chunk4", stock, 4))
        if device.type == "cuda" and p["case"] == "train":
            providers += [("openfold_cudagraph", stock, "graph"), ("plugin_cudagraph", plugin, "graph"),
                          ("openfold_captured", stock, "whole"), ("plugin_captured", plugin, "whole")]
        for name, block, chunk in providers:
            if args.providers is not None and name not in args.providers:
                continue
            row = dict(op="evoformer_block", provider=name, **p, dtype="bf16-autocast",
                       mode="fwd+bwd" if p["case"] == "train" else "fwd")
            try:
                if chunk == "graph":
                    step = graphed_step_fn(block, kw, p, device)
                elif chunk == "whole":
                    step = captured_step_fn(block, kw, p, device)
                else:
                    step = step_fn(block, kw, p, device, chunk)
                row.update(timed(step, device, args))
                if chunk in ("graph", "whole"):
                    row["peak_mib"] = None  # a replay allocates nothing: its memory is the graph's pool
            except Exception as e:  # noqa: BLE001 - out of memory is a result
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rec.add(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rec.done()


if __name__ == "__main__":
    main()
