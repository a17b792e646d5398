"""What the self-contained pages (report.html, the projection page) share: escaping, embedded pictures,
tables, and the script by which a page checks itself.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from pipeline.text import printable

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


def escaped(value) -> str:
    """HTML-escaped text; a file name's bytes that are not UTF-8 shown as \\xNN (a page must be valid UTF-8)."""
    return html.escape(printable(str(value)), quote=True)


def image(path: Path, alt: str) -> str:
    """A PNG embedded as a data URI (the page must stand alone); a note when the file is missing."""
    if not path.is_file():
        return f"<p><em>{escaped(path.name)} is missing</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escaped(alt)}" src="data:image/png;base64,{data}">'


def table(rows: list[tuple], header: tuple | None = None, numeric: set[int] = frozenset()) -> str:
    head = "<tr>" + "".join(f"<th>{escaped(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="n">{escaped(v)}</td>' if i in numeric else f"<td>{escaped(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"
