"""The pictures and the page of a run folder, drawn when train-head saves it: the confusion matrix (test, else
val), the sweep (validation accuracy of every candidate, the choice ringed), the contact sheet of its most confident
mistakes, and report.html, which embeds them all.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.heads.registry import HEADS
from pipeline.look import gallery, plots, report
from pipeline.runs.folder import CONFUSION_FILE, ERRORS_PNG, SWEEP_FILE, Run
from pipeline.runs.mistakes import Mistake
from pipeline.runs.record import describe_chosen
from pipeline.text import printable


def draw(run: Run, mistakes: list[Mistake], image_root: str | None, note: str | None) -> None:
    """Every picture of `run` (loaded or being written) into its folder, then report.html; `image_root`: the
    dataset the mistakes' paths are relative to (their thumbnails)."""
    name = printable(run.folder.name)
    shown = "test" if "test" in run.metrics else "val"
    plots.plot_confusion(run.metrics[shown]["confusion_matrix"], [printable(c) for c in run.class_names],
                         run.folder / CONFUSION_FILE, f"{name} ({shown})")
    _plot_sweep(run)
    gallery.write_sheet(run.folder / ERRORS_PNG, mistakes, Path(image_root) if image_root else None,
                        f"{run.folder.name} ({' + '.join(run.metrics)})")
    report.write(run, note)


def _plot_sweep(run: Run) -> None:
    """sweep.png: validation accuracy against the head's first swept hyperparameter, a line per other setting."""
    head, table = run.record.head, run.record.sweep
    x_name, *others = (*HEADS[head.kind].swept, "norm")
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in table:
        label = describe_chosen({"pool": row["pool"]} | {k: row["params"][k] for k in others if k in row["params"]})
        lines.setdefault(label, []).append((row["params"][x_name], row["val_accuracy"]))
    best = next(row for row in table if row["params"] == head.params and row["pool"] == head.chosen["pool"])
    plots.plot_sweep(lines, x_name, (best["params"][x_name], best["val_accuracy"]), run.folder / SWEEP_FILE,
                     f"{printable(run.folder.name)}: {head.kind} on validation")
