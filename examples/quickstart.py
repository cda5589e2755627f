"""The quickstart behind `make demo`: the whole uadct chain through its command line.

Generates a demo cohort from the SRI24 head T1 (healthy scans, and test scans with
inserted lesions and their masks), then runs `uadct preprocess`, `uadct train`,
`uadct score`, `uadct heatmap` and `uadct evaluate`, timing each step, and ends with
the evaluation table and the paths of the outputs. The test scans are also scored by the
pretrained T1 model shipped in the package (`uadct score t1 ...`: no training), with a
binary lesion mask at a 1 % healthy false-positive rate.

    python examples/quickstart.py --output demo_out
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def run(step: str, args: list[str], timings: dict[str, float]) -> None:
    """Run one `uadct` command, stream its output, stop the demo if it fails."""
    command = [sys.executable, "-m", "uadct", *args]
    console.rule(f"[bold]{step}[/bold]: uadct {' '.join(args)}")
    started = time.perf_counter()
    completed = subprocess.run(command)
    timings[step] = time.perf_counter() - started
    if completed.returncode != 0:
        console.print(f"[red]{step} failed (exit code {completed.returncode})[/red]")
        sys.exit(completed.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo_out"))
    parser.add_argument("--healthy", type=int, default=8)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=12, help="epoch limit (models that train; the default fits in one pass)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="Delete the output folder first.")
    options = parser.parse_args()
    root: Path = options.output
    if options.fresh and root.exists():
        shutil.rmtree(root)
    cohort, prep, maps, masks = root / "cohort", root / "prep", root / "maps", root / "brain_masks"
    figures, report, model = root / "figures", root / "report", root / "model.pt"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    run("demo cohort", ["demo", "-o", str(cohort), "--healthy", str(options.healthy), "--test", str(options.test),
                        "--seed", str(options.seed)], timings)
    run("preprocess", ["preprocess", str(cohort / "healthy"), "-o", str(prep)], timings)
    # no --model: the default model, the one that wins the real-data benchmark (README, docs/benchmarks.md)
    run("train", ["train", str(prep), "-o", str(model), "--epochs", str(options.epochs), "--patience", "4",
                  "--seed", str(options.seed)], timings)
    run("score", ["score", str(model), str(cohort / "test"), "-o", str(maps), "--brain-mask-out", str(masks), "--force"], timings)
    tests = sorted((cohort / "test").glob("*.nii.gz"))
    first = tests[0].name.removesuffix(".nii.gz")
    png = figures / f"{first}.png"
    # the baseline every report must show: the normalised intensity itself, no learning
    run("baseline: train", ["train", str(prep), "-o", str(root / "threshold.pt"), "--model", "threshold"], timings)
    run("baseline: score", ["score", str(root / "threshold.pt"), str(cohort / "test"), "-o", str(root / "maps_threshold"),
                            "--force"], timings)
    run("baseline: evaluate", ["evaluate", str(root / "maps_threshold"), str(cohort / "labels"), "-o",
                               str(root / "report_threshold"), "--brain-masks", str(masks)], timings)
    # the pretrained model shipped in the package: raw scans in, no training (uadct models --pretrained)
    run("pretrained: score", ["score", "t1", str(cohort / "test"), "-o", str(root / "maps_pretrained"),
                              "--fpr", "0.01", "--mask-out", str(root / "lesions_pretrained"), "--force"], timings)
    run("pretrained: evaluate", ["evaluate", str(root / "maps_pretrained"), str(cohort / "labels"), "-o",
                                 str(root / "report_pretrained"), "--brain-masks", str(masks)], timings)
    run("heatmap", ["heatmap", str(tests[0]), str(maps / f"{first}.nii.gz"), "-o", str(png),
                    "--label", str(cohort / "labels" / f"{first}.nii.gz")], timings)
    run("evaluate", ["evaluate", str(maps), str(cohort / "labels"), "-o", str(report), "--brain-masks", str(masks)], timings)
    total = time.perf_counter() - started

    metrics = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
    baseline = json.loads((root / "report_threshold" / "metrics.json").read_text(encoding="utf-8"))
    baseline_rows = {row["subject"]: row for row in baseline["per_subject"]}
    baseline_rows["pooled"] = baseline["pooled"]
    pretrained = json.loads((root / "report_pretrained" / "metrics.json").read_text(encoding="utf-8"))
    pretrained_rows = {row["subject"]: row for row in pretrained["per_subject"]}
    pretrained_rows["pooled"] = pretrained["pooled"]
    name = json.loads((maps / f"{first}.json").read_text(encoding="utf-8")).get("model") or "default model"
    table = Table(title=f"uadct demo: inserted lesions, voxel level inside the brain ({name}, the default model, "
                        "beside the threshold baseline and the pretrained t1 model, which was not trained here)")
    for column in ("subject", f"{name} AUROC", f"{name} AUPRC", f"{name} best Dice", "threshold AUROC", "threshold AUPRC",
                   "threshold best Dice", "pretrained t1 AUROC", "pretrained t1 AUPRC", "pretrained t1 best Dice"):
        table.add_column(column)
    for row in metrics["per_subject"] + [{"subject": "pooled", **metrics["pooled"]}]:
        other = baseline_rows.get(row["subject"], {})
        shipped = pretrained_rows.get(row["subject"], {})
        table.add_row(str(row["subject"]), *(_fmt(row.get(k)) for k in ("auroc", "auprc", "best_dice")),
                      _fmt(other.get("auroc")), _fmt(other.get("auprc")), _fmt(other.get("best_dice")),
                      _fmt(shipped.get("auroc")), _fmt(shipped.get("auprc")), _fmt(shipped.get("best_dice")),
                      style="bold" if row["subject"] == "pooled" else None)
    console.print(table)
    steps = Table("step", "seconds", title=f"wall time {total:.0f} s")
    for step, seconds in timings.items():
        steps.add_row(step, f"{seconds:.0f}")
    console.print(steps)
    console.print(f"map:    {maps / (first + '.nii.gz')}")
    console.print(f"PNG:    {png}")
    console.print(f"report: {report / 'report.md'}")
    console.print(f"pretrained t1 maps: {root / 'maps_pretrained'}; lesion masks (1 % healthy FPR): {root / 'lesions_pretrained'}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


if __name__ == "__main__":
    main()
