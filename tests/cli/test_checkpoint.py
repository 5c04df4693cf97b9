"""Checkpoint loading: every accepted format loads exactly; every bad input fails clearly and
leaves the model as it was.

The models are OpenFold's with shrunken stacks (tests/cli/conftest.py): same parameter naming as
the full model, a fraction of the size.
"""
import argparse
import math
import re

import numpy as np
import pytest
import torch

from fastfold_plugin.checkpoint import CheckpointError, load_checkpoint_, random_checkpoint

PRESET = "model_1_ptm"


def assert_same_params(model, expected_state):
    """Every parameter of `model` equals `expected_state`'s bit for bit."""
    state = model.state_dict()
    assert set(state) == set(expected_state)
    diff = [k for k in state if not torch.equal(state[k], expected_state[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lightning_checkpoint(state_dict, ema_params=None):
    """train_openfold.py's checkpoint layout: Lightning's wrapper keys + OpenFold's EMA entry."""
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.5.10",
        "state_dict": {"model." + k: v for k, v in state_dict.items()},
        "optimizer_states": [{
            "state": {0: {"step": torch.tensor(1200.0), "exp_avg": torch.randn(3)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "params": [0]}],
        }],
        "lr_schedulers": [{"last_epoch": 1200, "base_lrs": [1e-3]}],
        "loops": {},
        "callbacks": {},
    }
    if ema_params is not None:
        ckpt["ema"] = {"params": ema_params, "decay": 0.999}
    return ckpt


def write_alphafold_npz(model, preset, path):
    """Write `model`'s parameters as an AlphaFold .npz (AlphaFold's names and array layouts), by
    inverting OpenFold's own translation table (openfold.utils.import_weights)."""
    from openfold.utils import import_weights as iw

    heads = {}  # parameter -> number of heads of the attention module that owns it
    for m in model.modules():
        if hasattr(m, "no_heads") and hasattr(m, "linear_q"):
            for p in m.parameters():
                heads[id(p)] = m.no_heads

    pt = iw.ParamType

    def to_alphafold(kind, t):
        h = heads.get(id(t))
        t = t.detach()
        if kind is pt.LinearWeight:  # [out, in] -> [in, out]
            return t.T
        if kind is pt.LinearWeightMHA:  # [H * C, in] -> [in, H, C]
            return t.T.reshape(t.shape[1], h, -1)
        if kind is pt.LinearMHAOutputWeight:  # [out, H * C] -> [H, C, out]
            return t.T.reshape(h, -1, t.shape[0])
        if kind is pt.LinearBiasMHA:  # [H * C] -> [H, C]
            return t.reshape(h, -1)
        if kind is pt.LinearWeightOPM:  # [out, C * C] -> [C, C, out]
            c = math.isqrt(t.shape[1])
            return t.T.reshape(c, c, t.shape[0])
        return t

    flat = iw.process_translation_dict(iw.generate_translation_dict(model, preset))
    arrays = {}
    for key, p in flat.items():
        if p.stacked:
            arrays[key] = torch.stack([to_alphafold(p.param_type, t) for t in p.param]).numpy()
        else:
            arrays[key] = to_alphafold(p.param_type, p.param).numpy()
    np.savez(path, **arrays)
    return arrays


# ---------------------------------------------------------------------------------------------
# Accepted formats


def test_plain_state_dict(tiny_model, tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    what = load_checkpoint_(target, path, PRESET)
    assert what == "an OpenFold state_dict"
    assert_same_params(target, source.state_dict())


def test_training_checkpoint_uses_ema(tiny_model, tmp_path):
    ema, live, target = tiny_model(seed=1), tiny_model(seed=3), tiny_model(seed=2)
    path = tmp_path / "epoch=3-step=1200.ckpt"
    torch.save(lightning_checkpoint(live.state_dict(), ema_params=ema.state_dict()), path)
    what = load_checkpoint_(target, path, PRESET)
    assert "EMA" in what and "0.999" in what
    assert_same_params(target, ema.state_dict())


def test_training_checkpoint_without_ema(tiny_model, tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(source.state_dict()), path)
    what = load_checkpoint_(target, path, PRESET)
    assert "Lightning" in what and "'model.'" in what
    assert_same_params(target, source.state_dict())


@pytest.mark.parametrize("prefix", ["module.", "module.model.", "_orig_mod."])
def test_wrapper_prefixes_are_removed(tiny_model, tmp_path, prefix):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "weights.pt"
    torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
    assert f"'{prefix}'" in load_checkpoint_(target, path, PRESET)
    assert_same_params(target, source.state_dict())


@pytest.mark.parametrize("preset", ["model_1_ptm", "model_3"])
def test_alphafold_npz(tiny_model, tmp_path, preset):
    source, target = tiny_model(preset, seed=1), tiny_model(preset, seed=2)
    path = tmp_path / f"params_{preset}.npz"
    write_alphafold_npz(source, preset, path)
    what = load_checkpoint_(target, path, preset)
    assert what == f"AlphaFold parameters (.npz) for {preset}"
    assert_same_params(target, source.state_dict())


def test_npz_unused_arrays_are_reported(tiny_model, tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "params.npz"
    arrays = write_alphafold_npz(source, PRESET, path)
    np.savez(path, **arrays, **{"alphafold/alphafold_iteration/unused//weights": np.ones(3)})
    what = load_checkpoint_(target, path, PRESET)
    assert "1 unused arrays" in what and "unused//weights" in what
    assert_same_params(target, source.state_dict())


def test_random_checkpoint_created_once(tiny_model, tmp_path):
    first = tiny_model(seed=5)
    path, created = random_checkpoint(first, PRESET, tmp_path)
    assert created and path.is_file()
    state = torch.load(path, weights_only=True)
    assert_same_params(first, state)  # the model got the weights that were saved
    zeros = [k for k, v in state.items() if (v == 0).any()]
    assert not zeros, f"zero entries in {zeros[:3]}"

    second = tiny_model(seed=6)
    before = snapshot(second)
    again, created = random_checkpoint(second, PRESET, tmp_path)
    assert again == path and not created
    assert_same_params(second, before)  # a cached file leaves the model alone

    other_dir, _ = random_checkpoint(tiny_model(seed=7), PRESET, tmp_path / "other")
    assert_same_params(first, torch.load(other_dir, weights_only=True))  # seeded


# ---------------------------------------------------------------------------------------------
# Bad state dicts: the message says which keys and why; nothing is loaded


def _drop_block(sd):
    return {k: v for k, v in sd.items() if not k.startswith("evoformer.blocks.1.")}


def _add_keys(sd):
    extra = {f"evoformer.blocks.0.new_module_{i}.weight": torch.ones(2) for i in range(7)}
    return {**sd, **extra}


def _newer_openfold(sd):
    """0.0.1 names -> the newer OpenFold layout (the inverse of its convert_deprecated_v1_keys)."""
    renames = [("core.msa_transition", "msa_transition"),
               ("core.outer_product_mean", "outer_product_mean"),
               ("core.tri_", "pair_stack.tri_"),
               ("core.pair_transition", "pair_stack.pair_transition"),
               ("ipa.linear_q_points", "ipa.linear_q_points.linear"),
               ("ipa.linear_kv_points", "ipa.linear_kv_points.linear"),
               ("template_angle_embedder", "template_single_embedder")]
    out = {}
    for k, v in sd.items():
        for old, new in renames:
            k = k.replace(old, new)
        if k.startswith("template"):
            k = "template_embedder." + k
        out[k] = v
    return out


def _mixed_prefix(sd):
    return {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}


def _prefix_and_missing(sd):
    return {"module." + k: v for k, v in _drop_block(sd).items()}


@pytest.mark.parametrize("mangle, patterns", [
    pytest.param(_drop_block, [r"\d+ missing keys \(in the model, not in the checkpoint\): "
                               r"evoformer\.blocks\.1\.", r"\(\d+ more\)"], id="missing"),
    pytest.param(_add_keys, [r"7 unexpected keys \(in the checkpoint, not in the model\): "
                             r"evoformer\.blocks\.0\.new_module_0\.weight", r"\(2 more\)"],
                 id="unexpected"),
    pytest.param(_newer_openfold, [r"newer OpenFold", r"template_embedder", r"pair_stack",
                                   r"linear_\*_points\.linear", r"OpenFold 0\.0\.1"], id="newer"),
    pytest.param(_mixed_prefix, [r"\d+ of \d+ keys start with 'module\.'", r"mix of two layouts",
                                 r"^(?![\s\S]*pTM)"],  # the pTM head is there, under a prefix
                 id="mixed-prefix"),
    pytest.param(_prefix_and_missing, [r"after removing the key prefix 'module\.'",
                                       r"missing keys.*evoformer\.blocks\.1\."], id="prefix+missing"),
])
def test_bad_keys(tiny_model, tmp_path, mangle, patterns):
    target = tiny_model(seed=2)
    before = snapshot(target)
    path = tmp_path / "bad.pt"
    torch.save(mangle(tiny_model(seed=1).state_dict()), path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_(target, path, PRESET)
    msg = str(err.value)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not in:\n{msg}"
    assert "Nothing was loaded" in msg
    assert_same_params(target, before)


@pytest.mark.parametrize("source_preset, target_preset, pattern", [
    ("model_1", "model_1_ptm", r"no pTM head \(aux_heads\.tm\).*model_1_ptm expects one"),
    ("model_1_ptm", "model_1", r"has a pTM head \(aux_heads\.tm\): pass a _ptm --model-preset"),
    ("model_3_ptm", "model_1_ptm", r"no template weights.*model_3"),
    ("model_1_ptm", "model_3_ptm", r"template weights that model_3_ptm lacks"),
])
def test_checkpoint_of_another_preset(tiny_model, tmp_path, source_preset, target_preset, pattern):
    target = tiny_model(target_preset, seed=2)
    before = snapshot(target)
    path = tmp_path / "other_preset.pt"
    torch.save(tiny_model(source_preset, seed=1).state_dict(), path)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint_(target, path, target_preset)
    assert_same_params(target, before)


def test_other_block_count(tiny_model, tmp_path, shrink_config):
    from openfold.config import model_config
    from openfold.model.model import AlphaFold

    config = shrink_config(model_config(PRESET))
    config.model.evoformer_stack.no_blocks = 3
    path = tmp_path / "deeper.pt"
    torch.save(AlphaFold(config).state_dict(), path)
    target = tiny_model(seed=2)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"3 evoformer blocks, the model 2"):
        load_checkpoint_(target, path, PRESET)
    assert_same_params(target, before)


def test_wrong_shapes(tiny_model, tmp_path):
    target = tiny_model(seed=2)
    before = snapshot(target)
    sd = tiny_model(seed=1).state_dict()
    key = "evoformer.blocks.0.msa_att_row.mha.linear_q.weight"
    sd[key] = torch.randn(sd[key].shape[0] + 1, sd[key].shape[1])
    path = tmp_path / "shapes.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=rf"1 tensors of another shape:\n  {re.escape(key)}: "
                                              rf"checkpoint \(\d+, \d+\) vs model"):
        load_checkpoint_(target, path, PRESET)
    assert_same_params(target, before)


# ---------------------------------------------------------------------------------------------
# Files that are not (usable) checkpoints


def _text(path):
    path.write_text("MTYKLILNGKTLKGETTTEAVDAATAEKVFKQYANDNGVDGEWTYDDATKTFTVTE\n")


def _noise(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _list(path):
    torch.save([torch.ones(3)], path)


def _empty(path):
    torch.save({}, path)


def _not_tensors(path):
    torch.save({"learning_rate": 1e-3, "name": "run 7"}, path)


def _bad_ema(path):
    torch.save({"ema": {"decay": 0.999}}, path)


def _truncated(path):
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])


def _zip_of_other_things(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not weights")


def _other_npz(path):
    np.savez(path, weights=np.ones(3), bias=np.zeros(2))


@pytest.mark.parametrize("write, pattern", [
    pytest.param(_text, r"is not a checkpoint: .* starts with b'MTYK'", id="text"),
    pytest.param(_noise, r"is not a checkpoint", id="noise"),
    pytest.param(_list, r"holds a list, not a state_dict", id="list"),
    pytest.param(_empty, r"holds an empty dict", id="empty"),
    pytest.param(_not_tensors, r"keys learning_rate, name, which is neither a state_dict",
                 id="not-tensors"),
    pytest.param(_bad_ema, r"'ema' entry without OpenFold's", id="bad-ema"),
    pytest.param(_truncated, r"truncated or corrupt", id="truncated"),
    pytest.param(_zip_of_other_things, r"zip archive but neither .* holds readme\.txt", id="zip"),
    pytest.param(_other_npz, r"not AlphaFold parameters: no key starts with "
                             r"'alphafold/alphafold_iteration/' \(it holds bias, weights\)",
                 id="other-npz"),
])
def test_not_a_checkpoint(tiny_model, tmp_path, write, pattern):
    target = tiny_model(seed=2)
    before = snapshot(target)
    path = tmp_path / "file.npz" if write is _other_npz else tmp_path / "file.pt"
    write(path)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint_(target, path, PRESET)
    assert_same_params(target, before)


def test_missing_file_and_directory(tiny_model, tmp_path):
    target = tiny_model(seed=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_(target, tmp_path / "nope.pt", PRESET)
    with pytest.raises(CheckpointError, match="is a directory.*zero_to_fp32"):
        load_checkpoint_(target, tmp_path, PRESET)


def test_pickled_objects_need_trust(tiny_model, tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    before = snapshot(target)
    ckpt = lightning_checkpoint(source.state_dict(), ema_params=source.state_dict())
    ckpt["hyper_parameters"] = argparse.Namespace(lr=1e-3)  # Lightning hparams are often this
    path = tmp_path / "hparams.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"it pickles argparse\.Namespace.*--trust-checkpoint"):
        load_checkpoint_(target, path, PRESET)
    assert_same_params(target, before)
    load_checkpoint_(target, path, PRESET, trust_pickle=True)
    assert_same_params(target, source.state_dict())


# ---------------------------------------------------------------------------------------------
# AlphaFold .npz files that do not fit


@pytest.mark.parametrize("source_preset, target_preset, patterns", [
    ("model_3", "model_1_ptm", [r"file name says model_3; pass --model-preset model_3",
                                r"no template weights", r"no predicted-aligned-error \(pTM\) head",
                                r"missing keys \(in the model, not in the file\): "
                                r"alphafold/alphafold_iteration/"]),
    ("model_1_ptm", "model_1", [r"file name says model_1_ptm", r"has a pTM head: it belongs to a "
                                r"_ptm preset, not model_1", r"2 unexpected keys"]),
    ("model_1_ptm", "model_3_ptm", [r"template weights that model_3_ptm lacks"]),
])
def test_npz_of_another_preset(tiny_model, tmp_path, source_preset, target_preset, patterns):
    target = tiny_model(target_preset, seed=2)
    before = snapshot(target)
    path = tmp_path / f"params_{source_preset}.npz"
    write_alphafold_npz(tiny_model(source_preset, seed=1), source_preset, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_(target, path, target_preset)
    for pattern in patterns:
        assert re.search(pattern, str(err.value)), f"{pattern!r} not in:\n{err.value}"
    assert_same_params(target, before)


def test_npz_wrong_shapes(tiny_model, tmp_path):
    target = tiny_model(seed=2)
    before = snapshot(target)
    path = tmp_path / "params_model_1_ptm.npz"
    arrays = write_alphafold_npz(tiny_model(seed=1), PRESET, path)
    key = "alphafold/alphafold_iteration/structure_module/initial_projection//weights"
    arrays[key] = np.ones((arrays[key].shape[0] + 2, arrays[key].shape[1]), np.float32)
    np.savez(path, **arrays)
    with pytest.raises(CheckpointError, match=rf"1 arrays of another shape:\n  {re.escape(key)}"):
        load_checkpoint_(target, path, PRESET)
    assert_same_params(target, before)
