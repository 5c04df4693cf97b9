"""`fastfold-plugin predict` end to end: OpenFold features, stock and plugin runs on one model,
PDB files, the printed comparison, and the errors for bad inputs."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fastfold_plugin.cli import main
from fastfold_plugin.predict import PredictError, demo_fasta, predict

GB1 = "MTYKLILNGKTLKGETTTEAVDAATAEKVFKQYANDNGVDGEWTYDDATKTFTVTE"
DEVIATION = re.compile(r"largest deviation between the two predictions: (\S+) Angstrom "
                       r"\(atom positions, (\d+) atoms\), (\S+) pLDDT points")
# The reference ops are OpenFold's math in OpenFold's order: fp32 rounding at most.
ATOM_TOL, PLDDT_TOL = 1e-3, 1e-3
# the op table's names (docs/design.md)
OPS = ("attention", "softmax", "layer_norm", "layer_norm_torch", "transition",
       "triangle_multiplication", "outer_product_mean", "global_attention", "dropout_add")


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls to each reference op, to show that the plugin's forwards really ran."""
    from fastfold_plugin.kernels import get_ops

    table = get_ops("reference")
    calls = {}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for name in OPS:
        monkeypatch.setattr(table, name, counting(name, getattr(table, name)))
    return calls


def read_pdb(path: Path):
    """(atom names per residue index, coordinates [N_atoms, 3], remarks) of a PDB file."""
    atoms, xyz, remarks = [], [], []
    for line in path.read_text().splitlines():
        if line.startswith("ATOM"):
            atoms.append((int(line[22:26]), line[17:20], line[12:16].strip()))
            xyz.append([float(line[30:38]), float(line[38:46]), float(line[46:54])])
        elif line.startswith("REMARK"):
            remarks.append(line)
    return atoms, np.array(xyz), remarks


def check_outputs(report, printed_deviation=None):
    """Both PDB files hold the same atoms; coordinates and deviations agree with the report."""
    stock_atoms, stock_xyz, stock_remarks = read_pdb(report.stock.pdb_path)
    plugin_atoms, plugin_xyz, _ = read_pdb(report.plugin.pdb_path)
    assert stock_atoms == plugin_atoms
    assert len(stock_atoms) == report.atoms_compared > 0
    assert {a[0] for a in stock_atoms} == set(range(1, len(report.sequence) + 1))
    assert np.isfinite(stock_xyz).all() and stock_xyz.std() > 1.0  # a structure, not a point
    assert np.abs(stock_xyz - plugin_xyz).max() <= report.max_atom_deviation + 1e-3  # PDB rounding
    assert report.max_atom_deviation <= ATOM_TOL, report.max_atom_deviation
    assert report.max_plddt_deviation <= PLDDT_TOL, report.max_plddt_deviation
    if report.random_weights:
        assert any("RANDOM WEIGHTS" in r for r in stock_remarks)
    summary = json.loads(report.summary_path.read_text())
    assert summary["max_atom_deviation"] == report.max_atom_deviation
    assert summary["stock"]["pdb"] == str(report.stock.pdb_path)


def test_demo_end_to_end(tmp_path, capsys, op_calls):
    """The default demo through the command line: shipped FASTA, single-sequence features,
    random weights created once, real model_1_ptm, CPU defaults."""
    out = tmp_path / "out"
    assert main(["predict", "--output-dir", str(out), "--device", "cpu", "--no-warmup"]) == 0
    printed = capsys.readouterr().out
    assert "RANDOM" in printed and "meaningless" in printed
    assert "single sequence (a one-row MSA from the query)" in printed
    assert "1 recycling iteration" in printed

    atom_dev, n_atoms, plddt_dev = DEVIATION.search(printed).groups()
    assert float(atom_dev) <= ATOM_TOL and float(plddt_dev) <= PLDDT_TOL
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequence"] == GB1 and summary["msa_rows"] == 1
    assert summary["atoms_compared"] == int(n_atoms)
    assert summary["random_weights"] and summary["recycles"] == 1
    for run in ("stock", "plugin"):
        assert Path(summary[run]["pdb"]).is_file() and summary[run]["seconds"] > 0
    assert (tmp_path / "cache" / "fastfold-plugin" / "random_model_1_ptm_seed0.pt").is_file()
    for op in ("attention", "triangle_multiplication", "outer_product_mean", "transition"):
        assert op_calls.get(op, 0) > 0, f"the plugin run never called ops.{op}: {op_calls}"


def test_precomputed_alignments(tmp_path, shared_data, shrink_config, op_calls):
    """OpenFold-layout alignments (a3m + sto) for a 73-residue query; 2 recycling iterations.
    The network is shrunk through the config (1-2 blocks per stack) to keep the test fast."""
    samples = shared_data / "openfold_samples"
    report = predict(fasta=samples / "short.fasta", alignments=samples / "alignments" / "query",
                     output_dir=tmp_path / "out", device="cpu", recycles=2,
                     config_hook=shrink_config, echo=lambda s: None)
    assert report.msa_rows > 100 and len(report.sequence) == 73
    assert report.recycles == 2 and report.patched_modules > 0
    assert report.stock.pdb_path.name == "query_openfold.pdb"
    check_outputs(report)
    assert op_calls.get("attention", 0) > 0


def test_checkpoint_option(tmp_path, tiny_model, shrink_config):
    """--checkpoint weights are the ones both runs use (a shrunken model: config_hook)."""
    source = tiny_model(seed=3)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    report = predict(checkpoint=path, output_dir=tmp_path / "out", device="cpu",
                     config_hook=shrink_config, warmup=False, echo=lambda s: None)
    assert not report.random_weights and report.weights == "an OpenFold state_dict"
    assert not (tmp_path / "cache").exists()  # no random checkpoint made
    check_outputs(report)


# ---------------------------------------------------------------------------------------------
# Bad inputs: exit status 1, a message that says what is wrong, no structure written


def _two_records(tmp_path, data):
    p = tmp_path / "two.fasta"
    p.write_text(f">a\n{GB1}\n>b\n{GB1}\n")
    return [str(p)]


def _lower_case(tmp_path, data):
    p = tmp_path / "lower.fasta"
    p.write_text(f">gb1\n{GB1.lower()}\n")
    return [str(p)]


def _empty_alignments(tmp_path, data):
    (tmp_path / "aln").mkdir()
    (tmp_path / "aln" / "pdb70_hits.hhr").write_text("")
    return ["--alignments", str(tmp_path / "aln")]


def _other_query_alignments(tmp_path, data):
    # the 73-residue sample's alignments, with the (56-residue) demo FASTA
    return ["--alignments", str(data / "openfold_samples" / "alignments" / "query")]


@pytest.mark.parametrize("args, pattern", [
    pytest.param(lambda t, d: [str(t / "missing.fasta")], r"FASTA file .*missing\.fasta does not exist",
                 id="no-fasta"),
    pytest.param(_two_records, r"holds 2 sequences; predict folds one chain", id="two-records"),
    pytest.param(_lower_case, r"upper-case one-letter amino-acid codes; found 'a", id="lower-case"),
    pytest.param(lambda t, d: ["--alignments", str(t / "nope")], r"alignment directory .* does not exist",
                 id="no-alignments"),
    pytest.param(_empty_alignments, r"holds no \.a3m or \.sto alignment files", id="empty-alignments"),
    pytest.param(_other_query_alignments, r"are not for this query: their first row has 73 columns "
                                          r"and differs from the 56-residue sequence", id="other-query"),
    pytest.param(lambda t, d: ["--recycles", "0"], r"--recycles 0: the network runs at least once",
                 id="recycles"),
    pytest.param(lambda t, d: ["--model-preset", "model_9"], r"unknown model preset 'model_9'",
                 id="preset"),
])
def test_input_errors(tmp_path, capsys, shared_data, args, pattern):
    out = tmp_path / "out"
    assert main(["predict", *args(tmp_path, shared_data), "--output-dir", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastfold-plugin predict: error: ")
    assert re.search(pattern, err), err
    assert not out.exists()


def test_bad_checkpoint_cli(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("these are not weights\n")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(bad), "--output-dir", str(out),
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: .*notes\.pt is not a checkpoint", err), err
    assert not out.exists()


def test_cuda_requested_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["predict", "--device", "cuda", "--output-dir", str(tmp_path / "out")]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_triton_backend_without_gpu(tmp_path, monkeypatch, shrink_config):
    """backend='triton' where Triton cannot run fails before any model run, saying why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PredictError, match=r"cannot be enabled with backend='triton': .*TRITON_INTERPRET"):
        predict(output_dir=tmp_path / "out", device="cpu", backend="triton",
                config_hook=shrink_config, echo=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_demo_fasta_is_shipped():
    text = demo_fasta().read_text()
    assert text.startswith(">GB1 ") and "PDB 1PGA" in text and "UniProt P06654" in text
    assert text.splitlines()[1] == GB1


# ---------------------------------------------------------------------------------------------
# GPU: the default demo with the Triton kernels (run by `make test-gpu` on a CUDA machine)


@pytest.mark.gpu
def test_demo_gpu_triton_fp32(tmp_path):
    """Default GPU settings (4 recycling iterations, the preset's MSA sizes), Triton kernels,
    fp32 (no TF32): the plugin's accumulation order differs from cuBLAS's, nothing else."""
    report = predict(output_dir=tmp_path / "out", device="cuda", backend="triton",
                     echo=lambda s: None)
    assert report.recycles == 4 and report.patched_modules > 0
    stock_xyz = read_pdb(report.stock.pdb_path)[1]
    assert np.isfinite(stock_xyz).all()
    assert report.max_atom_deviation <= 0.05, report.max_atom_deviation
    assert report.max_plddt_deviation <= 0.05, report.max_plddt_deviation


@pytest.mark.gpu
def test_demo_gpu_triton_bf16(tmp_path):
    """bf16: the plugin's distance from the fp32 prediction stays within a small multiple of
    stock OpenFold's own bf16 distance from it."""
    fp32 = predict(output_dir=tmp_path / "fp32", device="cuda", backend="triton", recycles=1,
                   echo=lambda s: None)
    bf16 = predict(output_dir=tmp_path / "bf16", device="cuda", backend="triton", recycles=1,
                   precision="bf16", echo=lambda s: None)
    mask = fp32.stock.atom_mask > 0

    def dist(a, b):
        return np.linalg.norm(a.positions - b.positions, axis=-1)[mask]

    stock_err = dist(bf16.stock, fp32.stock)
    plugin_err = dist(bf16.plugin, fp32.stock)
    assert np.sqrt((plugin_err ** 2).mean()) <= 2 * np.sqrt((stock_err ** 2).mean()) + 0.05
    assert np.abs(bf16.plugin.plddt - fp32.stock.plddt).max() <= (
        2 * np.abs(bf16.stock.plddt - fp32.stock.plddt).max() + 0.5)
