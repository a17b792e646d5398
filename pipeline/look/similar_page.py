"""The page of `similar --html`: each query and its nearest cached images as thumbnails, with their rank,
similarity, path, split and label. Self-contained as the other pages are (pictures embedded, styles inline, no
script; a Content-Security-Policy says so); every name escaped. Cached images are read from the dataset the cache
was made from (its source root); one that has gone, or no longer decodes, is a grey placeholder with its name.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from pipeline.look.gallery import thumbnail
from pipeline.look.html import escaped

THUMB = 112  # px, the longer side of a thumbnail
MAX_SHOWN = 50  # neighbours drawn per query (the CSV and the table have them all): a page stays a few MB

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
section { margin: 18px 0; border-top: 1px solid #ccc; padding-top: 8px; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; width: 124px; font-size: 12px; word-break: break-all; }
figure.query { border: 2px solid #1f77b4; padding: 4px; }
.ph { width: 112px; height: 84px; background: #bbb; display: flex; align-items: center; justify-content: center;
      color: #fff; font-size: 11px; text-align: center; }
.error { color: #b00; }
"""


def _thumb_uri(path: Path | None) -> str | None:
    """A JPEG thumbnail of the image at `path` as a data URI; None when it cannot be read."""
    from PIL import Image

    pixels = thumbnail(path, THUMB)
    if pixels is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(path: Path | None, caption: str, css: str = "") -> str:
    uri = _thumb_uri(path)
    picture = f'<img alt="{escaped(caption)}" src="{uri}">' if uri else '<div class="ph">not found</div>'
    return f'<figure class="{css}">{picture}<figcaption>{escaped(caption)}</figcaption></figure>'


def query_section(q, root: Path | None) -> str:
    """One query: its own picture, then its neighbours'."""
    own = (root / q.query if root else None) if q.source == "cache" else Path(q.query)
    head = f"<h2>{escaped(q.query)} <small>({'in the cache' if q.source == 'cache' else 'image file'})</small></h2>"
    if q.error:
        return f'<section>{head}<p class="error">{escaped(q.error)}</p></section>'
    figures = [_figure(own, "query", "query")]
    figures += [_figure(root / n.path if root else None, f"{rank}. {n.similarity:.4f} {n.path} ({n.split}, {n.label})")
                for rank, n in enumerate(q.neighbours[:MAX_SHOWN], 1)]
    more = (f"<p>{len(q.neighbours) - MAX_SHOWN} more neighbours in the CSV (--out)</p>"
            if len(q.neighbours) > MAX_SHOWN else "")
    return f'<section>{head}<div class="row">{"".join(figures)}</div>{more}</section>'


def page(results, root: Path | None, title: str) -> str:
    """The whole page, as text."""
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">',
        f"<title>{escaped(title)}</title><style>{STYLE}</style></head><body>", f"<h1>{escaped(title)}</h1>",
        "<p>Similarity: the cosine of the features centred on the cache's mean row (as the audit's).</p>",
        *(query_section(q, root) for q in results), "</body></html>"])


def write_page(results, root: Path | None, out: Path, title: str) -> Path:
    out.write_text(page(results, root, title), encoding="utf-8")
    return out


def similar(cfg):
    """`pipeline similar` with its page: hub/similar.py's answer, the page drawn here (--html)."""
    from pipeline.hub.similar import similar as answer

    return answer(cfg, draw=write_page)
