"""Plot benchmark results: time vs N_res per provider, one panel per (op, case, mode).

    python benchmarks/plot.py [--results benchmarks/results] [--out docs/img]

Reads every <name>.jsonl under --results and writes <name>.png under --out. Rows come from the
last run (header) of each file for each GPU, so re-runs do not mix in older numbers.
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def last_run_rows(path: Path):
    """Result rows after the last header of the file, and that header."""
    header, rows = None, []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("record") == "header":
            header, rows = rec, []
        elif rec.get("record") == "result" and "ms" in rec:
            rows.append(rec)
    return header, rows


def plot_file(path: Path, out_dir: Path) -> Optional[Path]:
    """One PNG of the file's last run; None if that run timed nothing (e.g. a profile-only run)."""
    header, rows = last_run_rows(path)
    if not rows:
        return None
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["op"], r.get("case") or r.get("direction") or r.get("kind") or "",
               r.get("n_seq", ""), r["mode"])
        panels[key][r["provider"]].append((r["n_res"], r["ms"]))
    keys = sorted(k for k, v in panels.items() if max(len(p) for p in v.values()) > 1)
    if not keys:
        keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for provider, pts in sorted(panels[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        op, case, n_seq, mode = key
        ax.set_title(f"{op} {case} {'N_seq=' + str(n_seq) if n_seq != '' else ''} {mode}", fontsize=9)
        ax.set_xlabel("N_res")
        ax.set_ylabel("ms (median)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    gpu = header.get("gpu", header.get("device", "")) if header else ""
    fig.suptitle(f"{path.stem}: {gpu}, commit {str(header.get('commit', ''))[:7] if header else ''}",
                 fontsize=9)
    fig.tight_layout()
    out = out_dir / f"{path.stem}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.results.glob("*.jsonl")):
        out = plot_file(path, args.out)
        print(out if out else f"{path.name}: its last run has no timed rows, no plot")


if __name__ == "__main__":
    main()
