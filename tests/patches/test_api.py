"""register / enable / disable semantics, state_dict compatibility and bad input."""
import copy
import io

import pytest
import torch
from openfold.config import model_config
from openfold.model.evoformer import EvoformerBlock
from openfold.model.model import AlphaFold
from openfold.model.triangular_attention import TriangleAttention

import fastfold_plugin
from fastfold_plugin.patches.forwards import FORWARDS, replacement_for
from fastfold_plugin.testing import randomize_parameters_


def _block():
    return EvoformerBlock(c_m=16, c_z=8, c_hidden_msa_att=4, c_hidden_opm=4, c_hidden_mul=8,
                          c_hidden_pair_att=4, no_heads_msa=2, no_heads_pair=2, transition_n=2,
                          msa_dropout=0.15, pair_dropout=0.25, inf=1e9, eps=1e-10)


def _patched(module):
    return [m for m in module.modules() if "forward" in m.__dict__]


@pytest.fixture(scope="module")
def tiny_config():
    c = model_config("model_1_ptm")
    c.model.evoformer_stack.no_blocks = 1
    c.model.extra_msa.extra_msa_stack.no_blocks = 1
    c.model.template.template_pair_stack.no_blocks = 1
    c.model.structure_module.no_blocks = 1
    return c


@pytest.fixture(autouse=True)
def _unregister():
    yield
    fastfold_plugin.unregister()


def test_import_patches_nothing():
    block = _block()
    assert not _patched(block)
    assert not fastfold_plugin.is_registered()
    assert AlphaFold.__init__.__qualname__ == "AlphaFold.__init__"


def test_enable_disable_restores_stock_forwards_exactly():
    block = _block()
    before = {id(m): type(m).forward for m in block.modules()}
    handle = fastfold_plugin.enable(block, backend="reference")
    patched = _patched(block)
    # every Evoformer sub-module with a replacement is patched, on this instance only
    expected = [m for m in block.modules() if replacement_for(m) is not None]
    assert patched == expected and len(patched) >= 10
    for m in patched:
        assert m.forward.__func__ is replacement_for(m)
    handle.disable()
    assert not _patched(block)
    for m in block.modules():
        assert m.forward.__func__ is before[id(m)]
    handle.disable()  # idempotent


def test_neighbouring_instance_stays_stock():
    a, b = _block(), _block()
    with fastfold_plugin.enable(a, backend="reference"):
        assert _patched(a) and not _patched(b)
        assert type(b.msa_att_row).forward is b.msa_att_row.forward.__func__
    assert not _patched(a)


def test_enable_submodule_only():
    block = _block()
    handle = fastfold_plugin.enable(block.core.tri_att_start, backend="reference")
    assert _patched(block) == [block.core.tri_att_start, block.core.tri_att_start.mha]
    handle.disable()


def test_enable_twice_is_harmless_and_overlapping_handles():
    block = _block()
    h1 = fastfold_plugin.enable(block.core, backend="reference")
    n1 = h1.num_patched
    h2 = fastfold_plugin.enable(block, backend="reference")   # takes only what h1 left
    assert h2.num_patched == len(_patched(block)) - n1
    h3 = fastfold_plugin.enable(block, backend="reference")   # nothing new
    assert h3.num_patched == 0
    h1.disable()   # out of order: h2's modules stay patched, h1's are restored
    assert all(m in _patched(block) for m in block.modules() if "_fastfold_patch" in m.__dict__)
    assert not _patched(block.core.tri_att_start)
    assert _patched(block.msa_att_row)
    h2.disable()
    assert not _patched(block)
    with pytest.raises(ValueError, match="already enabled"):
        fastfold_plugin.enable(block, backend="reference")
        fastfold_plugin.enable(block, backend="auto")
    fastfold_plugin.disable(block)


def test_state_dict_unchanged_and_round_trips_both_ways():
    block = randomize_parameters_(_block(), seed=1)
    sd_before = {k: v.clone() for k, v in block.state_dict().items()}
    handle = fastfold_plugin.enable(block, backend="reference")
    sd_on = block.state_dict()
    assert list(sd_on) == list(sd_before)
    for k in sd_before:
        assert sd_on[k].shape == sd_before[k].shape and torch.equal(sd_on[k], sd_before[k])
    # save with the plugin on, load into a stock module; and the other way round
    buf = io.BytesIO()
    torch.save(block.state_dict(), buf)
    stock = _block()
    stock.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for k, v in stock.state_dict().items():
        assert torch.equal(v, sd_before[k])
    other = _block()
    fastfold_plugin.enable(other, backend="reference")
    other.load_state_dict(stock.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd_before[k])
    handle.disable()


def test_deepcopy_keeps_the_patch_on_the_copy():
    block = _block()
    fastfold_plugin.enable(block, backend="reference")
    clone = copy.deepcopy(block)
    for m in clone.modules():
        if "forward" in m.__dict__:
            assert m.forward.__self__ is m   # bound to the copy, not the original
    m = torch.randn(3, 5, 16)
    z = torch.randn(5, 5, 8)
    mask_m, mask_z = torch.ones(3, 5), torch.ones(5, 5)
    block.eval(), clone.eval()
    a = block(m, z, mask_m, mask_z)
    b = clone(m, z, mask_m, mask_z)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_register_enables_flagged_models_only(tiny_config):
    c = copy.deepcopy(tiny_config)
    c.globals.use_fastfold = True
    fastfold_plugin.register()
    fastfold_plugin.register()   # idempotent
    model = AlphaFold(c)
    assert fastfold_plugin.is_enabled(model)
    plain = AlphaFold(tiny_config)   # flag not set: stock
    assert not fastfold_plugin.is_enabled(plain)
    fastfold_plugin.unregister()
    assert not fastfold_plugin.is_enabled(AlphaFold(c))   # future builds only
    assert fastfold_plugin.is_enabled(model)
    assert fastfold_plugin.disable(model) > 0 and not fastfold_plugin.is_enabled(model)


def test_flag_without_register_is_a_no_op(tiny_config):
    c = copy.deepcopy(tiny_config)
    c.globals.use_fastfold = True
    assert not fastfold_plugin.is_enabled(AlphaFold(c))


def test_table_covers_every_evoformer_module():
    names = {cls.__name__ for cls in FORWARDS}
    for n in ["MSAAttention", "MSAColumnAttention", "MSAColumnGlobalAttention", "TriangleAttention",
              "TriangleMultiplicativeUpdate", "OuterProductMean", "MSATransition", "PairTransition",
              "TemplatePointwiseAttention", "EvoformerBlock", "EvoformerBlockCore", "ExtraMSABlock",
              "TemplatePairStackBlock", "Attention"]:
        assert n in names


# ---- bad input ------------------------------------------------------------------------------

def test_enable_rejects_non_openfold_objects():
    with pytest.raises(TypeError, match="OpenFold"):
        fastfold_plugin.enable(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        fastfold_plugin.enable("model")


def test_enable_rejects_unknown_backend_without_patching():
    block = _block()
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fastfold_plugin.enable(block, backend="cuda")
    assert not _patched(block)


def test_flag_with_incompatible_openfold_option(tiny_config):
    c = copy.deepcopy(tiny_config)
    c.globals.use_fastfold = True
    c.globals.use_flash = True
    fastfold_plugin.register()
    with pytest.raises(ValueError, match="use_flash"):
        AlphaFold(c)
    c.globals.use_flash = False
    c.globals.offload_inference = True
    with pytest.raises(ValueError, match="offload_inference"):
        AlphaFold(c)
    c.globals.offload_inference = False
    c.globals.fastfold_backend = "fast"
    with pytest.raises(ValueError, match="fastfold_backend"):
        AlphaFold(c)


def test_enable_checks_the_models_config(tiny_config):
    c = copy.deepcopy(tiny_config)
    model = AlphaFold(c)
    model.globals.use_flash = True   # AlphaFold keeps a reference to config.globals
    with pytest.raises(ValueError, match="use_flash"):
        fastfold_plugin.enable(model)
    assert not fastfold_plugin.is_enabled(model)


def test_triton_backend_where_triton_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    block = _block()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastfold_plugin.enable(block, backend="triton")
    assert not _patched(block)
    block2 = TriangleAttention(8, 4, 2)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        fastfold_plugin.enable(block2, backend="triton")


def test_dap_training_on_cuda_keeps_the_asked_for_ops():
    """DAP training on CUDA runs the Triton ops like everything else (a fallback to the reference
    ops stood while the attention kernels' fully masked rows broke DAP gradients on GPUs)."""
    from fastfold_plugin._api import _PatchState
    from fastfold_plugin.kernels import get_ops

    class Group:
        size = 2

    class CudaInput:  # only `is_cuda` is read
        is_cuda = True

    assert torch.is_grad_enabled()
    assert _PatchState("triton", owner_id=0, dap=Group()).ops_for(CudaInput()) is get_ops("triton")
    assert _PatchState("reference", owner_id=0, dap=Group()).ops_for(CudaInput()) is get_ops("reference")
