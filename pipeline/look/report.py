"""report.html: one self-contained page per run folder (no network: styles inline, pictures embedded as data
URIs).

The run's record (data, config, the choice and why, timings), its metrics per split, the confusion matrix, the sweep,
the gallery of its most confident mistakes, and links to the run's files. Written by train-head with the other
files; `pipeline report RUN` writes it again (for a run made before it existed). Every text is HTML-escaped: a run's
names come from file and class names, which are anyone's.

The page checks itself: a script records any error (window.onerror, console.error) in a hidden element and marks
the body `data-rendered="yes"` when it ran to the end; the browser tests read both from the rendered DOM.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.look.html import CHECK, DONE, escaped, image, table
from pipeline.runs.folder import CONFUSION_FILE, ERRORS_PNG, REPORT_HTML, SWEEP_FILE, Run, load_run, selection_note
from pipeline.runs.record import describe_chosen

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; padding: 0 16px; color: #222; }
h1 { font-size: 20px; overflow-wrap: anywhere; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; max-width: 100%; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; overflow-wrap: anywhere; }  /* long names wrap */
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff3cd; border: 1px solid #e0c36a; padding: 8px 12px; }
img { max-width: 100%; border: 1px solid #eee; } code { font-size: 12px; word-break: break-all; }
"""


def _metrics(split: str, m: dict) -> str:
    headline = [("accuracy", m["accuracy"]), ("balanced accuracy", m["balanced_accuracy"]), ("macro-F1", m["macro_f1"]),
                ("log loss", m["log_loss"])] + ([("top-5 accuracy", m["top5_accuracy"])] if "top5_accuracy" in m else [])
    per_class = [(name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"])
                 for name, c in m["per_class"].items()]
    return (f"<h2>{escaped(split)} (n={m['n']})</h2>" + table([(k, f"{v:.4f}") for k, v in headline], numeric={1})
            + table(per_class, ("class", "precision", "recall", "F1", "support"), numeric={1, 2, 3, 4}))


def _record(run: Run) -> str:
    r = run.record
    rows = [("head", r.head.kind), ("chosen", describe_chosen(r.head.chosen)),
            ("candidates", len(r.sweep)), ("refit on train + val", "yes" if r.refit else "no"),
            ("train", f"{r.splits.train} ({r.splits.n_train} rows)"), ("validation", f"{r.splits.val} ({r.splits.n_val} rows)"),
            ("test", r.splits.test or "none"), ("features", r.features.path), ("fingerprint", r.features.fingerprint),
            ("classes", ", ".join(r.features.class_names)), ("created", r.created),
            ("fit", f"{r.timings.fit_seconds:.2f} s (loading {r.timings.load_seconds:.2f} s"
                    + ("" if r.timings.score_seconds is None else f", scoring {r.timings.score_seconds:.2f} s") + ")")]
    if r.loading:
        rows += [(f"why: {key}", reason) for key, reason in r.loading.reasons.items()]
    rows += [(f"fitted: {path}", method) for path, method in r.head.methods.items()]
    rows += [("versions", ", ".join(f"{k} {v}" for k, v in r.versions.items()))]
    return table(rows) + f"<details><summary>extractor config</summary><code>{escaped(json.dumps(r.features.config, sort_keys=True))}</code></details>"


def _files(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir()  # hidden files: the save's mark (runs/folder.py: SAVING_MARK)
             if p.is_file() and p.name != REPORT_HTML and not p.name.startswith(".")) if folder.is_dir() else []
    return "<ul>" + "".join(f'<li><a href="{escaped(name)}">{escaped(name)}</a></li>' for name in names) + "</ul>"


def render(run: Run, note: str | None) -> str:
    """The page of a run; `note`: the selection caveat (runs.folder.selection_note), if any."""
    folder, name = run.folder, run.record.name
    splits = "".join(_metrics(split, m) for split, m in run.metrics.items())
    shown = "test" if "test" in run.metrics else "val"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
        f"<title>{escaped(name)}: vggcache run</title><style>{STYLE}</style></head><body>", CHECK,
        f"<h1>{escaped(name)}</h1>", f'<p class="note">{escaped(note)}</p>' if note else "",
        "<h2>Run</h2>", _record(run), splits,
        f"<h2>Confusion matrix ({shown})</h2>", image(folder / CONFUSION_FILE, "confusion matrix"),
        "<h2>Sweep: validation accuracy of every candidate</h2>", image(folder / SWEEP_FILE, "sweep"),
        "<h2>Most confident mistakes</h2>", image(folder / ERRORS_PNG, "mistakes"),
        "<h2>Files</h2>", _files(folder), DONE, "</body></html>"])


def write(run: Run, note: str | None = None) -> Path:
    path = Path(run.folder) / REPORT_HTML
    path.write_text(render(run, note), encoding="utf-8")
    return path


def rewrite(folder: Path) -> Path:
    """`pipeline report RUN`: the page of a saved run written again (for a run made before report.html existed)."""
    run = load_run(folder)
    return write(run, selection_note(len(run.record.sweep), run.metrics))
