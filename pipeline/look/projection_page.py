"""`pipeline projection FILE --html OUT`: the 2-D projection as one interactive, self-contained page (no network).

Hover a point: its thumbnail, path, split, label and (given --run) the run's wrong prediction; filter by split and
by class with checkboxes; a run's mistakes are ringed. Drawn as inline SVG by a few lines of JavaScript: no plotting
library (Plotly or Bokeh would embed 1 to 4 MB of script for a scatter plot), so the page is the data and the
thumbnails (about 1 KB each at 40 px: 7.4 MB for 5,000 points, the most it samples). Thumbnails come from the dataset
the cache was made from; an image that has gone shows none. Every text is escaped (file and class names are
anyone's). Like report.html, the page records its own errors and marks itself rendered, for the browser tests.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.look.gallery import thumbnail
from pipeline.look.html import CHECK, DONE, escaped
from pipeline.text import printable

log = logging.getLogger(__name__)
MAX_POINTS = 5_000  # a seeded sample beyond this: thumbnails and hover stay quick
THUMB = 40  # px, the longer side of a hover thumbnail (JPEG)
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5"]

SCRIPT = r"""
const data = JSON.parse(document.getElementById("points").textContent);
const svg = document.getElementById("map"), tip = document.getElementById("tip"), ns = "http://www.w3.org/2000/svg";
const shown = {split: new Set(data.splits), label: new Set(data.classes.map((_, i) => i))};
const shapes = {train: "circle", val: "triangle", test: "square"};
function marker(p) {
  const s = shapes[p.split] || "diamond", x = 20 + p.x * 760, y = 20 + (1 - p.y) * 560;
  const el = document.createElementNS(ns, s === "circle" ? "circle" : "polygon");
  if (s === "circle") { el.setAttribute("cx", x); el.setAttribute("cy", y); el.setAttribute("r", 4); }
  else {
    const d = {triangle: [[0, -5], [4.5, 3.5], [-4.5, 3.5]], square: [[-4, -4], [4, -4], [4, 4], [-4, 4]],
               diamond: [[0, -5], [5, 0], [0, 5], [-5, 0]]}[s];
    el.setAttribute("points", d.map(([a, b]) => (x + a) + "," + (y + b)).join(" "));
  }
  el.setAttribute("fill", data.colors[p.label % data.colors.length]);
  el.setAttribute("fill-opacity", "0.75");
  if (p.wrong) { el.setAttribute("stroke", "#d00"); el.setAttribute("stroke-width", "2"); }
  el.addEventListener("mouseenter", ev => show(p, ev));
  el.addEventListener("mouseleave", () => { tip.hidden = true; });
  p.el = el;
  return el;
}
function show(p, ev) {
  tip.replaceChildren();
  if (p.thumb) { const img = document.createElement("img"); img.src = "data:image/jpeg;base64," + p.thumb; tip.append(img); }
  const lines = [p.path, "split " + p.split, "label " + data.classes[p.label]];
  if (p.wrong) lines.push("predicted " + p.wrong + " (wrong)");
  for (const line of lines) { const div = document.createElement("div"); div.textContent = line; tip.append(div); }
  tip.style.left = (ev.pageX + 12) + "px"; tip.style.top = (ev.pageY + 12) + "px"; tip.hidden = false;
}
function refresh() {
  for (const p of data.points) p.el.style.display = shown.split.has(p.split) && shown.label.has(p.label) ? "" : "none";
}
function filters(id, values, names, set) {
  const box = document.getElementById(id);
  values.forEach((v, i) => {
    const label = document.createElement("label"), input = document.createElement("input");
    input.type = "checkbox"; input.checked = true;
    input.addEventListener("change", () => { input.checked ? set.add(v) : set.delete(v); refresh(); });
    label.append(input, " " + names[i]);
    if (id === "classes") { const dot = document.createElement("span"); dot.className = "dot";
      dot.style.background = data.colors[i % data.colors.length]; label.prepend(dot); }
    box.append(label);
  });
}
for (const p of data.points) svg.append(marker(p));
filters("splits", data.splits, data.splits, shown.split);
filters("classes", data.classes.map((_, i) => i), data.classes, shown.label);
document.getElementById("count").textContent = data.points.length + " images";
if (location.hash === "#selftest" && data.points.length) {  // what a person does, done by the page (browser tests)
  const first = data.points[0];
  first.el.dispatchEvent(new MouseEvent("mouseenter", {clientX: 10, clientY: 10}));
  const hovered = !tip.hidden && tip.textContent.includes(first.path);
  const box = document.querySelector("#classes input");
  box.checked = false; box.dispatchEvent(new Event("change"));
  const hidden = data.points.filter(p => p.label === 0).every(p => p.el.style.display === "none");
  document.body.dataset.selftest = hovered && hidden ? "passed" : "failed";
}
"""

STYLE = """
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; } h1 { font-size: 16px; overflow-wrap: anywhere; }
#wrap { display: flex; gap: 16px; align-items: flex-start; } svg { border: 1px solid #ccc; background: #fff; }
#side label { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; max-width: 260px; }
#side h2 { font-size: 13px; margin: 12px 0 4px; } .dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 4px; }
#tip { position: absolute; background: #fff; border: 1px solid #888; padding: 4px; max-width: 320px; word-break: break-all;
       box-shadow: 0 1px 4px rgba(0,0,0,.3); pointer-events: none; } #tip img { display: block; margin-bottom: 3px; width: 80px; }
"""


def _thumb(path: Path) -> str | None:
    """A small JPEG of the image at `path`, base64; None when it cannot be read (gone, changed, not an image)."""
    from PIL import Image

    pixels = thumbnail(path, THUMB)
    if pixels is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=70)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def page(xy: np.ndarray, labels: np.ndarray, splits: np.ndarray, paths, names: list[str], wrong: dict[str, str],
         root: Path | None, title: str) -> str:
    """The page of projected points (`wrong`: path -> the run's wrong prediction)."""
    lo, span = xy.min(0), np.maximum(np.ptp(xy, 0), 1e-12)
    unit = (xy - lo) / span
    points = [{"x": round(float(u[0]), 4), "y": round(float(u[1]), 4), "label": int(y), "split": str(s),
               "path": printable(str(p)), "wrong": printable(wrong.get(str(p), "")),
               "thumb": _thumb(root / p) if root else None}
              for u, y, s, p in zip(unit, labels, splits, paths)]
    data = {"points": points, "classes": [printable(n) for n in names], "splits": sorted(set(map(str, splits))), "colors": PALETTE}
    payload = json.dumps(data).replace("</", "<\\/")  # no "</script>" can end the block early, whatever a name holds
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
        f"<title>{escaped(title)}</title><style>{STYLE}</style></head><body>", CHECK, f"<h1>{escaped(title)}</h1>",
        '<div id="wrap"><svg id="map" width="800" height="600" viewBox="0 0 800 600"></svg>',
        '<div id="side"><div id="count"></div><h2>splits (circle train, triangle val, square test)</h2><div id="splits"></div>'
        '<h2>classes</h2><div id="classes"></div><h2>ringed in red: the run\'s mistakes</h2></div></div>',
        '<div id="tip" hidden></div>', f'<script type="application/json" id="points">{payload}</script>',
        f"<script>{SCRIPT}</script>", DONE, "</body></html>"])
