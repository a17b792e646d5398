"""report.html: one self-contained page per run folder (no network: styles inline, pictures embedded as data URIs).

The run's record (data, config, the choice and why, timings), its metrics per split, the confusion matrix, the sweep,
the gallery of its most confident mistakes, and links to the run's files. Written by train-head with the other
files; `pipeline report RUN` writes it again (for a run made before it existed). Every text is HTML-escaped: a run's
names come from file and class names, which are anyone's.

The page checks itself: a script records any error (window.onerror, console.error) in a hidden element and marks
the body `data-rendered="yes"` when it ran to the end; the browser tests read both from the rendered DOM.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from pipeline.files import printable

REPORT_HTML = "report.html"

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; padding: 0 16px; color: #222; }
h1 { font-size: 20px; word-break: break-all; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff3cd; border: 1px solid #e0c36a; padding: 8px 12px; }
img { max-width: 100%; border: 1px solid #eee; } code { font-size: 12px; word-break: break-all; }
"""

CHECK = """
<pre id="page-errors" hidden></pre>
<script>
(function () {
  var box = document.getElementById("page-errors");
  function record(text) { box.textContent += text + "\\n"; document.body.dataset.errors = "yes"; }
  window.addEventListener("error", function (e) { record("error: " + e.message); });
  var original = console.error;
  console.error = function () { record("console.error: " + Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); };
})();
</script>
"""
DONE = '<script>document.body.dataset.rendered = "yes";</script>'


def e(value) -> str:
    """HTML-escaped text; a file name's bytes that are not UTF-8 shown as \\xNN (a page must be valid UTF-8)."""
    return html.escape(printable(str(value)), quote=True)


def image(path: Path, alt: str) -> str:
    """A PNG embedded as a data URI (the page must stand alone); a note when the file is missing."""
    if not path.is_file():
        return f"<p><em>{e(path.name)} is missing</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">'


def table(rows: list[tuple], header: tuple | None = None, numeric: set[int] = frozenset()) -> str:
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="n">{e(v)}</td>' if i in numeric else f"<td>{e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _metrics(split: str, m: dict) -> str:
    headline = [("accuracy", m["accuracy"]), ("balanced accuracy", m["balanced_accuracy"]), ("macro-F1", m["macro_f1"]),
                ("log loss", m["log_loss"])] + ([("top-5 accuracy", m["top5_accuracy"])] if "top5_accuracy" in m else [])
    per_class = [(name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"])
                 for name, c in m["per_class"].items()]
    return (f"<h2>{e(split)} (n={m['n']})</h2>" + table([(k, f"{v:.4f}") for k, v in headline], numeric={1})
            + table(per_class, ("class", "precision", "recall", "F1", "support"), numeric={1, 2, 3, 4}))


def _record(run) -> str:
    r = run.record
    rows = [("head", r.head.kind), ("chosen", ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in r.head.chosen.items())),
            ("candidates", len(r.sweep)), ("refit on train + val", "yes" if r.refit else "no"),
            ("train", f"{r.splits.train} ({r.splits.n_train} rows)"), ("validation", f"{r.splits.val} ({r.splits.n_val} rows)"),
            ("test", r.splits.test or "none"), ("features", r.features.path), ("fingerprint", r.features.fingerprint),
            ("classes", ", ".join(r.features.class_names)), ("created", r.created),
            ("fit", f"{r.timings.fit_seconds:.2f} s (loading {r.timings.load_seconds:.2f} s)")]
    if r.loading:
        rows += [(f"why: {key}", reason) for key, reason in r.loading.reasons.items()]
    rows += [("versions", ", ".join(f"{k} {v}" for k, v in r.versions.items()))]
    return table(rows) + f"<details><summary>extractor config</summary><code>{e(json.dumps(r.features.config, sort_keys=True))}</code></details>"


def _files(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != REPORT_HTML) if folder.is_dir() else []
    return "<ul>" + "".join(f'<li><a href="{e(name)}">{e(name)}</a></li>' for name in names) + "</ul>"


def render(run, note: str | None) -> str:
    """The page of a loaded run (runs.Run); `note`: the selection caveat (runs.selection_note), if any."""
    folder, name = run.folder, run.record.name
    splits = "".join(_metrics(split, m) for split, m in run.metrics.items())
    shown = "test" if "test" in run.metrics else "val"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
        f"<title>{e(name)}: vggcache run</title><style>{STYLE}</style></head><body>", CHECK,
        f"<h1>{e(name)}</h1>", f'<p class="note">{e(note)}</p>' if note else "",
        "<h2>Run</h2>", _record(run), splits,
        f"<h2>Confusion matrix ({shown})</h2>", image(folder / "confusion_matrix.png", "confusion matrix"),
        "<h2>Sweep: validation accuracy of every candidate</h2>", image(folder / "sweep.png", "sweep"),
        "<h2>Most confident mistakes</h2>", image(folder / "errors.png", "mistakes"),
        "<h2>Files</h2>", _files(folder), DONE, "</body></html>"])


def write(run, note: str | None = None) -> Path:
    path = Path(run.folder) / REPORT_HTML
    path.write_text(render(run, note), encoding="utf-8")
    return path
