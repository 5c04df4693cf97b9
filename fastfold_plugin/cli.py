"""The ``fastfold-plugin`` command line (console script ``fastfold_plugin.cli:main``).

``fastfold-plugin predict [FASTA] [options]`` folds one protein with stock OpenFold and with the
plugin on the same weights and features, prints both wall times and the largest deviation
between the predictions, and writes both structures as PDB files (see docs/predict.md).
"""
import argparse
import sys
import warnings
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastfold-plugin",
        description="Fused Triton kernels and Dynamic Axial Parallelism for OpenFold.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "predict",
        help="fold a protein with stock OpenFold and with the plugin, and compare",
        description="Fold one protein twice from the same weights and features: stock OpenFold, "
                    "then with fastfold-plugin enabled on the same model. Prints each run's wall "
                    "time and the largest deviation between the two predictions, and writes "
                    "both structures as PDB files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("fasta", nargs="?", default=None, metavar="FASTA",
                   help="one-sequence FASTA file (default: the shipped demo, the B1 domain of "
                        "protein G, PDB 1PGA, 56 residues)")
    p.add_argument("--alignments", metavar="DIR", default=None,
                   help="precomputed alignments in OpenFold's layout (.a3m/.sto files for this "
                        "query); default: the query alone, as a one-row MSA")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="OpenFold state_dict (.pt), OpenFold training checkpoint (EMA weights "
                        "used) or AlphaFold parameters (.npz) for --model-preset; default: seeded "
                        "random weights, created once under ~/.cache/fastfold-plugin (the "
                        "structure is then meaningless)")
    p.add_argument("--output-dir", metavar="DIR", default="fastfold_predictions",
                   help="where the PDB files and summary.json go")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: both runs under bf16 autocast")
    p.add_argument("--recycles", type=int, metavar="N", default=None,
                   help="recycling iterations = passes through the network (1: no recycling; "
                        "OpenFold's max_recycling_iters is N-1); default 4 on a GPU (AlphaFold's "
                        "default), 1 on the CPU")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                   help="the plugin's ops: Triton kernels, plain-PyTorch references, or auto "
                        "(Triton on a GPU, references on the CPU)")
    p.add_argument("--model-preset", dest="preset", default="model_1_ptm", metavar="PRESET",
                   help="OpenFold config preset (model_1..model_5, with or without _ptm); "
                        "must match the checkpoint")
    p.add_argument("--max-msa-clusters", type=int, metavar="N", default=None,
                   help="MSA cluster rows (default: the preset's, 32 on the CPU)")
    p.add_argument("--max-extra-msa", type=int, metavar="N", default=None,
                   help="extra MSA rows (default: the preset's, 128 on the CPU)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="time each run from cold (includes chunk-size tuning and kernel "
                        "compilation)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a checkpoint that holds Python objects besides tensors (runs "
                        "code from the file: only for files you trust)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "predict":
        return _predict(args)
    return 2


def _predict(args) -> int:
    from fastfold_plugin.checkpoint import CheckpointError
    from fastfold_plugin.predict import PredictError, format_summary, predict

    # OpenFold 0.0.1 triggers torch deprecation warnings (non-tuple indexing,
    # torch.cuda.amp.autocast) on every run; they say nothing about this run.
    for category in (UserWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"openfold(\.|$)")
    try:
        report = predict(
            fasta=args.fasta, alignments=args.alignments, checkpoint=args.checkpoint,
            output_dir=args.output_dir, device=args.device, precision=args.precision,
            recycles=args.recycles, backend=args.backend, preset=args.preset,
            max_msa_clusters=args.max_msa_clusters, max_extra_msa=args.max_extra_msa,
            trust_checkpoint=args.trust_checkpoint, warmup=args.warmup,
        )
    except (CheckpointError, PredictError, FileNotFoundError) as e:
        print(f"fastfold-plugin predict: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
