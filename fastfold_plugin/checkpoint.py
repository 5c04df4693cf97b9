"""Load OpenFold and AlphaFold weights into an OpenFold ``AlphaFold`` model, or fail clearly.

Accepted files (recognised by their content, not their name):

- a plain OpenFold ``state_dict`` written with ``torch.save(model.state_dict(), path)``;
- an OpenFold training checkpoint (``train_openfold.py``'s PyTorch Lightning layout): the EMA
  parameters under ``["ema"]["params"]`` are used when present, as OpenFold's inference script
  does; otherwise the Lightning ``["state_dict"]``, whose keys carry the wrapper's ``model.``
  prefix. DeepSpeed's model-states file (``["module"]``) is read the same way. Whole-key prefixes
  that wrappers add (``module.``, ``model.``, ``_orig_mod.``) are stripped when every key has them;
- AlphaFold's parameter files (``params_model_1_ptm.npz``), loaded with OpenFold's own
  ``openfold.utils.import_weights.import_jax_weights_`` for the model preset.

Every key and shape is checked before the model is touched: on any error the model keeps the
parameters it had, and the message names the keys at fault (the first few and the count) and,
where the key set shows it, why (a newer OpenFold's names, another model preset, a training
wrapper's prefixes).

Files are unpickled with ``torch.load(weights_only=True)``; a checkpoint that also pickles other
Python objects needs ``trust_pickle=True`` (``--trust-checkpoint``), which runs arbitrary code
from the file: only for files you trust.
"""
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

_NPZ_PREFIX = "alphafold/alphafold_iteration/"
# Prefixes that training wrappers put in front of every key: DDP / DeepSpeed (`module.`), the
# Lightning wrapper of train_openfold.py (`model.`), torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# Key patterns of the newer OpenFold layout (the multimer-era refactor; OpenFold's own
# `convert_deprecated_v1_keys` maps 0.0.1 names onto them).
_NEWER_OPENFOLD_MARKERS = (
    (r"^template_embedder\.", "template modules grouped under template_embedder.*"),
    (r"template_single_embedder", "template_angle_embedder renamed template_single_embedder"),
    (r"\.pair_stack\.tri_", "Evoformer pair updates moved from core.* to pair_stack.*"),
    (r"blocks\.\d+\.(msa_transition|outer_product_mean)\.", "block sub-modules out of core.*"),
    (r"\.linear_(q|kv)_points\.linear\.", "IPA point projections as linear_*_points.linear.*"),
)
_SHOW = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model as it is; the model is unchanged."""


def default_cache_dir() -> Path:
    """Where the seeded random-weight checkpoints are kept: $XDG_CACHE_HOME/fastfold-plugin,
    else ~/.cache/fastfold-plugin."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastfold-plugin"


def random_checkpoint(model: torch.nn.Module, preset: str, cache_dir: Optional[Path] = None,
                      seed: int = 0) -> Tuple[Path, bool]:
    """The seeded random-weight checkpoint for `preset`, written once: returns (path, created).

    When the file does not exist yet, `model` gets fresh random parameters (every entry non-zero:
    OpenFold zero-initialises final and gating layers, under which the model's output would not
    depend on most of the network) and its ``state_dict`` is saved. The weights are random: a
    structure predicted with them is meaningless.
    """
    from fastfold_plugin.testing import randomize_parameters_

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"random_{preset}_seed{seed}.pt"
    if path.is_file():
        return path, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    randomize_parameters_(model, seed=seed)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)  # never leave a half-written file under the final name
    finally:
        if tmp.exists():
            tmp.unlink()
    return path, True


def load_checkpoint_(model: torch.nn.Module, path, preset: str, trust_pickle: bool = False) -> str:
    """Load the weights in `path` into `model` (an OpenFold ``AlphaFold`` built for `preset`).

    Returns a one-line description of what was loaded. Raises :class:`CheckpointError` (or
    ``FileNotFoundError``) before touching the model when the file does not fit it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory. A DeepSpeed checkpoint folder must first be converted to one "
            f"file (DeepSpeed's zero_to_fp32.py); pass a .pt state_dict, an OpenFold training "
            f"checkpoint (.ckpt) or AlphaFold parameters (.npz)")
    kind = _sniff(path)
    if kind == "npz":
        return _load_npz_(model, path, preset)
    obj = _torch_load(path, trust_pickle)
    state_dict, what = _unwrap(obj, path)
    state_dict, stripped = _match_keys(state_dict, model.state_dict(), path, preset)
    _check_shapes(state_dict, model.state_dict(), path)
    model.load_state_dict(state_dict, strict=True)
    if stripped:
        what += f" (key prefix '{stripped}' removed)"
    return what


# ---------------------------------------------------------------------------------------------
# Reading the file


def _sniff(path: Path) -> str:
    """'npz' or 'torch'; anything else is not a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{path} looks like a zip archive but cannot be read ({e}): "
                                  f"a truncated or corrupt download?") from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        raise CheckpointError(
            f"{path} is a zip archive but neither a PyTorch checkpoint (torch.save) nor an "
            f"AlphaFold parameter file (.npz); it holds {_few(names)}")
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return "torch"
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a PyTorch file written by torch.save (an OpenFold "
        f"state_dict or training checkpoint) or AlphaFold parameters (.npz), but the file starts "
        f"with {head!r}")


def _torch_load(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if not trust_pickle and "weights only load failed" in str(e).lower():
            m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            reason = f"it pickles {m.group(1)}" if m else "not a plain state_dict"
            raise CheckpointError(
                f"{path} pickles Python objects besides tensors and plain containers, which "
                f"torch.load(weights_only=True) refuses ({reason}). If you trust "
                f"the file, pass --trust-checkpoint (trust_pickle=True), which runs code from "
                f"it; or re-save just the weights: torch.save(model.state_dict(), 'weights.pt')"
            ) from None
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint: {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (truncated or "
                              f"corrupt?): {e}") from None


def _unwrap(obj, path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """The model's state_dict inside a loaded checkpoint, and a description of where it was."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(), f"a pickled {type(obj).__name__} module"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict or an "
                              f"OpenFold training checkpoint")
    if not obj:
        raise CheckpointError(f"{path} holds an empty dict")
    ema = obj.get("ema")
    if ema is not None:
        if not isinstance(ema, Mapping) or not isinstance(ema.get("params"), Mapping):
            raise CheckpointError(f"{path} has an 'ema' entry without OpenFold's "
                                  f"{{'params': state_dict, 'decay': ...}} layout")
        decay = ema.get("decay")
        return _tensors(ema["params"], path, "['ema']['params']"), (
            "EMA parameters of an OpenFold training checkpoint"
            + (f" (decay {decay})" if decay is not None else ""))
    for key, what in (("state_dict", "the model weights of a PyTorch Lightning training checkpoint"),
                      ("module", "the model weights of a DeepSpeed checkpoint")):
        if isinstance(obj.get(key), Mapping):
            return _tensors(obj[key], path, f"['{key}']"), what + " (no EMA parameters in it)"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "an OpenFold state_dict"
    raise CheckpointError(
        f"{path} holds a dict with keys {_few(obj)}, which is neither a state_dict (names -> "
        f"tensors) nor an OpenFold training checkpoint ('ema' -> {{'params': ...}} or "
        f"'state_dict')")


def _tensors(sd: Mapping, path: Path, where: str) -> Dict[str, torch.Tensor]:
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}{where} has {len(bad)} entries that are not tensors: "
                              f"{_few(bad)}")
    return dict(sd)


# ---------------------------------------------------------------------------------------------
# Matching a state_dict to the model


def _match_keys(sd: Dict[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor], path: Path,
                preset: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """Strip wrapper prefixes shared by every key, then require the model's exact key set."""
    expected = set(model_sd)
    stripped = ""
    while set(sd) != expected:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        stripped += prefix
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        hints = _diagnose(unexpected, set(sd), expected, preset)
        raise CheckpointError(
            f"{path} does not fit the {preset} model"
            + (f" (after removing the key prefix '{stripped}')" if stripped else "") + ":\n"
            + _key_lines(missing, unexpected) + "".join(f"\n  {h}" for h in hints)
            + "\nNothing was loaded.")
    return sd, stripped


def _check_shapes(sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor],
                  path: Path) -> None:
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
           for k, v in model_sd.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise _shape_error(path, f"has the model's keys but {len(bad)} tensors", bad,
                           "It was saved from a model with another configuration (channel "
                           "sizes, number of bins or heads).")


def _shape_error(path: Path, what: str, bad: List[str], why: str = "") -> CheckpointError:
    more = f"\n  ... ({len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
    return CheckpointError(f"{path} {what} of another shape:\n  " + "\n  ".join(bad[:_SHOW]) + more
                           + (f"\n  {why}" if why else "") + "\nNothing was loaded.")


def _key_lines(missing: List[str], unexpected: List[str], in_file: str = "checkpoint") -> str:
    lines = []
    if missing:
        lines.append(f"  {len(missing)} missing keys (in the model, not in the {in_file}): "
                     f"{_few(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys (in the {in_file}, not in the "
                     f"model): {_few(unexpected)}")
    return "\n".join(lines)


def _diagnose(unexpected: List[str], got: set, expected: set, preset: str) -> List[str]:
    """Reasons a key set differs from the model's, as far as the names show them."""
    hints = []
    newer = [why for pattern, why in _NEWER_OPENFOLD_MARKERS
             if any(re.search(pattern, _strip(k)) for k in unexpected)]
    if newer:
        hints.append("This looks like a checkpoint from a newer OpenFold (" + "; ".join(newer)
                     + "). fastfold-plugin runs OpenFold 0.0.1, whose parameter names differ: "
                     "use a checkpoint saved by OpenFold 0.0.1, or rename the keys back.")
    for prefix in _WRAPPER_PREFIXES:
        n = sum(k.startswith(prefix) for k in got)
        if 0 < n < len(got):
            hints.append(f"{n} of {len(got)} keys start with '{prefix}' (a training wrapper's "
                         f"prefix) and the others do not: a mix of two layouts?")
    # what the checkpoint has, whatever prefixes its keys carry
    has = lambda keys, start: any(_strip(k).startswith(start) for k in keys)  # noqa: E731
    if has(expected, "template") and not has(got, "template"):
        hints.append(f"The checkpoint has no template weights: it comes from a preset without "
                     f"templates (model_3, model_4, model_5 and their _ptm versions), not "
                     f"{preset}. Pass the matching --model-preset.")
    if has(got, "template") and not has(expected, "template"):
        hints.append(f"The checkpoint has template weights that {preset} lacks: it comes from a "
                     f"preset with templates (model_1, model_2 or their _ptm versions).")
    if has(expected, "aux_heads.tm.") and not has(got, "aux_heads.tm."):
        hints.append(f"The checkpoint has no pTM head (aux_heads.tm): it comes from a preset "
                     f"without _ptm; {preset} expects one.")
    if has(got, "aux_heads.tm.") and not has(expected, "aux_heads.tm."):
        hints.append(f"The checkpoint has a pTM head (aux_heads.tm): pass a _ptm --model-preset "
                     f"instead of {preset}.")
    for stack in ("evoformer", "extra_msa_stack", "template_pair_stack"):
        n_got, n_exp = _num_blocks(got, stack), _num_blocks(expected, stack)
        if n_got and n_exp and n_got != n_exp:
            hints.append(f"The checkpoint has {n_got} {stack} blocks, the model {n_exp}: it was "
                         f"trained with another configuration.")
    return hints


def _strip(key: str) -> str:
    """`key` without the wrapper prefixes it starts with."""
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return key
        key = key[len(prefix):]


def _num_blocks(keys: Iterable[str], stack: str) -> int:
    pattern = re.compile(rf"^{stack}\.blocks\.(\d+)\.")
    idx = [int(m.group(1)) for m in (pattern.match(_strip(k)) for k in keys) if m]
    return max(idx) + 1 if idx else 0


def _few(items, n: int = _SHOW) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------
# AlphaFold .npz parameters


def _load_npz_(model: torch.nn.Module, path: Path, preset: str) -> str:
    """Check an AlphaFold parameter file against OpenFold's translation table for `preset`, then
    load it with OpenFold's ``import_jax_weights_``."""
    from openfold.utils import import_weights

    flat = import_weights.process_translation_dict(
        import_weights.generate_translation_dict(model, preset))
    try:
        with np.load(path, allow_pickle=False) as data:
            unexpected = _check_npz(data, flat, path, preset)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} cannot be read as an AlphaFold .npz file: {e}") from None
    import_weights.import_jax_weights_(model, str(path), version=preset)
    note = f"; {len(unexpected)} unused arrays ({_few(unexpected, 3)})" if unexpected else ""
    return f"AlphaFold parameters (.npz) for {preset}{note}"


def _check_npz(data, flat, path: Path, preset: str) -> List[str]:
    """Raise unless every array the translation table `flat` needs is in `data` with a shape
    that transforms into its parameter's; returns the unused array names."""
    keys = set(data.files)
    if not any(k.startswith(_NPZ_PREFIX) for k in keys):
        raise CheckpointError(f"{path} is an .npz file but not AlphaFold parameters: no key "
                              f"starts with '{_NPZ_PREFIX}' (it holds {_few(sorted(keys))})")
    missing = sorted(set(flat) - keys)
    unexpected = sorted(keys - set(flat))
    hints = _npz_hints(missing, unexpected, keys, path, preset)
    if missing or (unexpected and hints):
        raise CheckpointError(
            f"{path} does not fit the {preset} model:\n"
            + _key_lines(missing, unexpected, "file") + "".join(f"\n  {h}" for h in hints)
            + "\nNothing was loaded.")
    bad = []
    for k, p in flat.items():
        arr = torch.from_numpy(data[k])
        params = p.param if p.stacked else [p.param]
        slices = list(torch.unbind(arr, 0)) if p.stacked and arr.dim() else [arr]
        if len(slices) != len(params):
            bad.append(f"{k}: {len(slices)} stacked layers, model has {len(params)}")
            continue
        for w, ref in zip(slices, params):
            try:
                shape = tuple(p.param_type.transformation(w).shape)
            except RuntimeError:
                shape = None
            if shape != tuple(ref.shape):
                bad.append(f"{k}: file {tuple(arr.shape)} does not give the model's "
                           f"{tuple(ref.shape)}")
                break
    if bad:
        raise _shape_error(path, f"has the {preset} names but {len(bad)} arrays", bad)
    return unexpected


def _npz_hints(missing: List[str], unexpected: List[str], keys: set, path: Path,
               preset: str) -> List[str]:
    hints = []
    guess = re.match(r"^params_(model_\d(_ptm)?|model_\d_multimer(_v\d)?)\.npz$", path.name)
    if guess and guess.group(1) != preset:
        hints.append(f"The file name says {guess.group(1)}; pass --model-preset {guess.group(1)}.")
    if any("multimer" in k or "~_relative_encoding" in k for k in missing + unexpected):
        hints.append("These are AlphaFold-Multimer parameters; OpenFold 0.0.1's monomer model "
                     "cannot use them.")
    templ = f"{_NPZ_PREFIX}evoformer/template_"
    if any(k.startswith(templ) for k in missing) and not any(k.startswith(templ) for k in keys):
        hints.append(f"The file has no template weights: it comes from a preset without "
                     f"templates (model_3, model_4, model_5), not {preset}.")
    if unexpected and any(k.startswith(templ) for k in unexpected):
        hints.append(f"The file has template weights that {preset} lacks: it comes from a preset "
                     f"with templates (model_1, model_2).")
    pae = f"{_NPZ_PREFIX}predicted_aligned_error_head/"
    if any(k.startswith(pae) for k in missing):
        hints.append(f"The file has no predicted-aligned-error (pTM) head: it is not a _ptm "
                     f"preset's file, and {preset} needs one.")
    if any(k.startswith(pae) for k in unexpected):
        hints.append(f"The file has a pTM head: it belongs to a _ptm preset, not {preset}.")
    return hints
