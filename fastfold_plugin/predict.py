"""Predict one protein's structure twice, with stock OpenFold and with fastfold-plugin, and compare.

The features come from OpenFold's own data pipeline: ``DataPipeline.process_fasta`` (from the
FASTA alone it builds a one-row MSA from the query; with an alignment directory in OpenFold's
layout it reads the ``.a3m``/``.sto`` files there; no template search is run, so there are no
templates) and then ``FeaturePipeline(config.data).process_features(feats, "predict")``. One
``AlphaFold`` model is built and loaded once; it runs stock, then with
``fastfold_plugin.enable(model, backend=...)``, then ``handle.disable()`` restores it. Both runs
see the same features and weights; each gets one untimed warm-up pass first (chunk-size tuning,
kernel compilation), then a timed run in OpenFold's inference mode (eval + ``no_grad``).

CPU defaults keep the demo short on a small machine: 1 recycling iteration (one pass) and the
MSA capped at 32 clusters and 128 extra rows. A one-row MSA is padded to the cap either way, so
for single-sequence input the cap changes only the run time, not the result.
"""
import contextlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from fastfold_plugin.checkpoint import load_checkpoint_, random_checkpoint

DEMO_FASTA = "gb1.fasta"
PRESETS = tuple(f"model_{i}{s}" for s in ("", "_ptm") for i in range(1, 6))
# (recycling iterations, max MSA clusters, max extra MSA rows) on the CPU; None: the preset's.
CPU_DEFAULTS = (1, 32, 128)
GPU_RECYCLES = 4  # AlphaFold's default: 4 passes (OpenFold's max_recycling_iters = 3)


class PredictError(ValueError):
    """An input or setting `predict` cannot work with; the message says which and why."""


@dataclass
class RunResult:
    """One model run: wall time (seconds, the timed run only) and the prediction."""
    label: str
    seconds: float
    positions: np.ndarray = field(repr=False)    # [N_res, 37, 3] Angstrom
    atom_mask: np.ndarray = field(repr=False)    # [N_res, 37]
    plddt: np.ndarray = field(repr=False)        # [N_res], 0-100
    pdb_path: Optional[Path] = None


@dataclass
class Report:
    """What `predict` did and found."""
    name: str
    sequence: str
    fasta: Path
    alignments: Optional[Path]
    msa_rows: int
    preset: str
    device: str
    precision: str
    recycles: int
    max_msa_clusters: int
    max_extra_msa: int
    backend: str
    weights: str
    random_weights: bool
    stock: RunResult
    plugin: RunResult
    max_atom_deviation: float     # Angstrom, over atoms present in both predictions
    max_plddt_deviation: float    # pLDDT points (0-100)
    atoms_compared: int
    warmup: bool
    patched_modules: int          # OpenFold modules running the plugin's forwards
    summary_path: Optional[Path] = None


def demo_fasta() -> Path:
    """The FASTA shipped with the package (the demo input)."""
    return Path(str(resources.files("fastfold_plugin") / "data" / DEMO_FASTA))


def predict(
    fasta=None,
    alignments=None,
    checkpoint=None,
    output_dir="fastfold_predictions",
    device: Optional[str] = None,
    precision: str = "fp32",
    recycles: Optional[int] = None,
    backend: str = "auto",
    preset: str = "model_1_ptm",
    max_msa_clusters: Optional[int] = None,
    max_extra_msa: Optional[int] = None,
    trust_checkpoint: bool = False,
    warmup: bool = True,
    cache_dir=None,
    config_hook: Optional[Callable] = None,
    echo: Callable[[str], None] = print,
) -> Report:
    """Fold the protein in `fasta` (default: the shipped demo) stock and with the plugin.

    Writes ``<name>_openfold.pdb``, ``<name>_fastfold.pdb`` and ``summary.json`` to `output_dir`
    and returns a :class:`Report`. `recycles` counts passes through the network (1: no
    recycling). `config_hook(config)` may edit the OpenFold config before the model is built
    (tests use it to shrink the network). Without `checkpoint`, a seeded random-weight
    checkpoint is created once in `cache_dir` (default ``~/.cache/fastfold-plugin``).
    """
    import fastfold_plugin

    device = _resolve_device(device)
    if precision not in ("fp32", "bf16"):
        raise PredictError(f"precision {precision!r}: choose fp32 or bf16")
    if preset not in PRESETS:
        raise PredictError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if backend not in fastfold_plugin.BACKENDS:
        raise PredictError(f"unknown backend {backend!r}; choose one of "
                           f"{', '.join(fastfold_plugin.BACKENDS)}")
    on_cpu = device.type == "cpu"
    recycles = recycles if recycles is not None else (CPU_DEFAULTS[0] if on_cpu else GPU_RECYCLES)
    if recycles < 1:
        raise PredictError(f"--recycles {recycles}: the network runs at least once (1 = no "
                           f"recycling)")
    fasta = Path(fasta) if fasta is not None else demo_fasta()
    name, sequence = _read_fasta(fasta)
    output_dir = Path(output_dir)

    config = _config(preset, recycles, on_cpu, max_msa_clusters, max_extra_msa)
    if config_hook is not None:
        config_hook(config)
    n_clusters = config.data.predict.max_msa_clusters
    n_extra = config.data.predict.max_extra_msa

    echo(f"fastfold-plugin predict: {name}, {len(sequence)} residues ({fasta})")
    batch, msa_rows = _features(fasta, sequence, alignments, config)
    echo(f"  features  {_msa_words(alignments, msa_rows)}; no templates; MSA capped at "
         f"{n_clusters} clusters + {n_extra} extra rows")
    echo(f"  model     {preset}, {recycles} recycling iteration{'s' * (recycles != 1)} "
         f"({'passes' if recycles != 1 else 'pass'} through the network), {precision}, {device}")

    from openfold.model.model import AlphaFold

    model = AlphaFold(config).eval()
    random_weights = checkpoint is None
    if random_weights:
        echo("  weights   RANDOM (seeded): the predicted structure is meaningless. Pass "
             "--checkpoint for real weights.")
        try:
            checkpoint, created = random_checkpoint(model, preset, cache_dir)
        except OSError as e:  # an unwritable cache: keep the file with the outputs instead
            echo(f"            cannot write the cache ({e}); using {output_dir}")
            checkpoint, created = random_checkpoint(model, preset, output_dir)
        echo(f"            {'created' if created else 'cached'}: {checkpoint}")
    weights = load_checkpoint_(model, checkpoint, preset, trust_pickle=trust_checkpoint)
    if not random_weights:
        echo(f"  weights   {weights} from {checkpoint}")
    model = model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    # Check that the plugin can run here before spending time on the stock run.
    try:
        fastfold_plugin.enable(model, backend=backend).disable()
    except (RuntimeError, ValueError, TypeError) as e:
        raise PredictError(f"fastfold-plugin cannot be enabled with backend={backend!r}: {e}") from e

    stock = _timed_run(model, batch, device, precision, "stock OpenFold", warmup)
    with fastfold_plugin.enable(model, backend=backend) as handle:
        patched = handle.num_patched
        if patched == 0:  # the comparison would be stock against stock
            raise PredictError(f"fastfold_plugin.enable() patched no module of this {preset} model")
        plugin = _timed_run(model, batch, device, precision, f"fastfold-plugin ({backend})", warmup)

    present = (stock.atom_mask > 0) & (plugin.atom_mask > 0)
    dist = np.linalg.norm(stock.positions - plugin.positions, axis=-1)[present]
    report = Report(
        name=name, sequence=sequence, fasta=fasta,
        alignments=Path(alignments) if alignments is not None else None, msa_rows=msa_rows,
        preset=preset, device=str(device), precision=precision, recycles=recycles,
        max_msa_clusters=n_clusters, max_extra_msa=n_extra, backend=backend, weights=weights,
        random_weights=random_weights, stock=stock, plugin=plugin,
        max_atom_deviation=float(np.max(dist)) if dist.size else float("nan"),
        max_plddt_deviation=float(np.max(np.abs(stock.plddt - plugin.plddt))),
        atoms_compared=int(dist.size), warmup=warmup, patched_modules=patched,
    )
    _write_outputs(report, batch, output_dir)
    return report


def format_summary(r: Report) -> str:
    """The closing summary `fastfold-plugin predict` prints."""
    warm = ", after one untimed warm-up pass each" if r.warmup else " (no warm-up)"
    lines = [
        "",
        f"Summary: {r.name} ({len(r.sequence)} residues), {r.preset}, {r.recycles} recycling "
        f"iteration{'s' * (r.recycles != 1)}, {r.precision}, {r.device}",
        f"  {'run':<28}{'wall time':>12}{'mean pLDDT':>12}",
        f"  {'stock OpenFold':<28}{r.stock.seconds:>10.2f} s{r.stock.plddt.mean():>12.2f}",
        f"  {'fastfold-plugin (' + r.backend + ')':<28}{r.plugin.seconds:>10.2f} s"
        f"{r.plugin.plddt.mean():>12.2f}   ({r.patched_modules} OpenFold modules patched)",
        f"  wall times: the model call only{warm}; stock / plugin = "
        f"{r.stock.seconds / r.plugin.seconds:.2f}x",
        f"  largest deviation between the two predictions: {r.max_atom_deviation:.3g} Angstrom "
        f"(atom positions, {r.atoms_compared} atoms), {r.max_plddt_deviation:.3g} pLDDT points "
        f"(0-100 scale)",
        f"  structures: {r.stock.pdb_path}",
        f"              {r.plugin.pdb_path}",
    ]
    if not r.random_weights:
        lines.append(f"  weights: {r.weights}")
    else:
        lines.append("  WEIGHTS ARE RANDOM: both structures are meaningless; the run shows that "
                     "the plugin reproduces stock OpenFold. Pass --checkpoint for real weights.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise PredictError(f"device {device!r}: choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"--device {device}: CUDA is not available to this PyTorch "
                           f"({torch.__version__}); use --device cpu")
    return torch.device(device)


def _read_fasta(fasta: Path):
    from openfold.data import parsers

    if not fasta.is_file():
        raise FileNotFoundError(f"FASTA file {fasta} does not exist")
    seqs, descs = parsers.parse_fasta(fasta.read_text())
    if len(seqs) != 1:
        raise PredictError(f"{fasta} holds {len(seqs)} sequences; predict folds one chain: give "
                           f"a FASTA file with exactly one '>' record")
    seq = seqs[0]
    bad = sorted(set(re.sub(r"[A-Z]", "", seq)))
    if not seq or bad:
        raise PredictError(f"{fasta}: the sequence must be upper-case one-letter amino-acid codes"
                           + (f"; found {''.join(bad)!r}" if bad else "; it is empty"))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", (descs[0].split() or ["query"])[0]) or "query"
    return name, seq


def _config(preset, recycles, on_cpu, max_msa_clusters, max_extra_msa):
    from openfold.config import model_config

    config = model_config(preset)
    config.data.common.max_recycling_iters = recycles - 1
    if on_cpu:
        config.data.predict.max_msa_clusters = CPU_DEFAULTS[1]
        config.data.predict.max_extra_msa = CPU_DEFAULTS[2]
    if max_msa_clusters is not None:
        config.data.predict.max_msa_clusters = max_msa_clusters
    if max_extra_msa is not None:
        config.data.predict.max_extra_msa = max_extra_msa
    return config


def _features(fasta: Path, sequence: str, alignments, config):
    """OpenFold's features for `fasta`: (batch with the recycling dim last, MSA rows)."""
    try:
        from openfold.data.data_pipeline import DataPipeline
        from openfold.data.feature_pipeline import FeaturePipeline
        from openfold.np import residue_constants
    except (ImportError, AttributeError) as e:
        raise PredictError(
            f"OpenFold's data pipeline does not import in this Python ({type(e).__name__}: {e}). "
            f"The PyPI openfold==0.0.1 sdist needs source fixes for numpy 2 and current "
            f"biopython; `make install` builds a fixed copy into .venv (docs/install.md).") from e

    with contextlib.ExitStack() as stack:
        if alignments is None:
            aln_dir = stack.enter_context(tempfile.TemporaryDirectory())
        else:
            aln_dir = Path(alignments)
            if not aln_dir.is_dir():
                raise FileNotFoundError(f"alignment directory {aln_dir} does not exist")
            if not any(p.suffix in (".a3m", ".sto") for p in aln_dir.iterdir()):
                raise PredictError(f"{aln_dir} holds no .a3m or .sto alignment files (OpenFold's "
                                   f"layout: bfd_uniclust_hits.a3m, mgnify_hits.sto, ...)")
        try:
            feats = DataPipeline(template_featurizer=None).process_fasta(
                fasta_path=str(fasta), alignment_dir=str(aln_dir))
        except ValueError as e:
            raise PredictError(f"OpenFold's data pipeline rejected the input: {e}") from e
    query = np.array([residue_constants.HHBLITS_AA_TO_ID[c] for c in sequence])
    msa = feats["msa"]
    if msa.shape[1] != len(sequence) or not np.array_equal(msa[0], query):
        raise PredictError(f"the alignments in {alignments} are not for this query: their first "
                           f"row has {msa.shape[1]} columns and differs from the "
                           f"{len(sequence)}-residue sequence in {fasta}")
    batch = FeaturePipeline(config.data).process_features(feats, "predict")
    return batch, int(msa.shape[0])


def _msa_words(alignments, msa_rows: int) -> str:
    if alignments is None:
        return "single sequence (a one-row MSA from the query)"
    return f"{msa_rows} MSA rows from {alignments}"


def _timed_run(model, batch, device, precision, label, warmup) -> RunResult:
    """One untimed pass (first recycling slice) when `warmup`, then the timed prediction."""
    if warmup:
        _forward(model, {k: v[..., :1] for k, v in batch.items()}, device, precision,
                 f"{label}, warm-up")
    t0 = _now(device)
    out = _forward(model, batch, device, precision, label)
    seconds = _now(device) - t0
    return RunResult(
        label=label, seconds=seconds,
        positions=out["final_atom_positions"].float().cpu().numpy(),
        atom_mask=out["final_atom_mask"].float().cpu().numpy(),
        plddt=out["plddt"].float().cpu().numpy(),
    )


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _forward(model, batch, device, precision, label) -> Dict[str, torch.Tensor]:
    passes = batch["aatype"].shape[-1]
    bar = tqdm(total=passes, desc=f"  {label}", unit="pass", disable=None, leave=False)
    # the structure module runs once per pass: a cheap, exact progress signal
    hook = model.structure_module.register_forward_hook(lambda *_: bar.update(1))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    try:
        with torch.no_grad(), autocast:
            return model(dict(batch))
    except RuntimeError as e:
        if "not implemented on CPU" in str(e):
            raise PredictError(
                f"stock OpenFold failed on the CPU: {e}. This OpenFold was built with the "
                f"placeholder of its attn_core_inplace_cuda extension; `make install` builds "
                f"the CPU implementation (docs/install.md).") from e
        raise
    finally:
        hook.remove()
        bar.close()


def _write_outputs(r: Report, batch, output_dir: Path) -> None:
    from openfold.np import protein

    output_dir.mkdir(parents=True, exist_ok=True)
    feats = {k: batch[k][..., -1].cpu().numpy() for k in ("aatype", "residue_index")}
    what = "RANDOM WEIGHTS, structure meaningless" if r.random_weights else r.weights
    for run, tag in ((r.stock, "openfold"), (r.plugin, "fastfold")):
        prot = protein.from_prediction(
            features=feats,
            result={"final_atom_positions": run.positions, "final_atom_mask": run.atom_mask},
            b_factors=np.repeat(run.plddt[:, None], run.atom_mask.shape[-1], axis=-1),
            remark=f"fastfold-plugin predict, {run.label}, {r.preset}, {what}",
        )
        run.pdb_path = output_dir / f"{r.name}_{tag}.pdb"
        run.pdb_path.write_text(protein.to_pdb(prot))
    summary = {f.name: getattr(r, f.name) for f in fields(r)
               if f.name not in ("stock", "plugin", "summary_path")}
    for run, key in ((r.stock, "stock"), (r.plugin, "plugin")):
        summary[key] = {"label": run.label, "seconds": run.seconds,
                        "mean_plddt": float(run.plddt.mean()), "pdb": run.pdb_path}
    r.summary_path = output_dir / "summary.json"
    r.summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
