"""`pipeline map`: the cache's embeddings in two dimensions, coloured by class, one marker per split, and, given a
run, its mistakes ringed: clusters, outliers and overlapping classes at a glance.

PCA (scikit-learn, any number of rows: a seeded sample of at most MAX_PCA_POINTS is drawn) or t-SNE (on at most
MAX_TSNE_POINTS rows, after PCA to 50 dimensions, as its authors advise). A map cache is average-pooled first, or
pooled as the run's head pools it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.cache.store import Cache, open_cache
from pipeline.errors import UserError
from pipeline.files import printable
from pipeline.look import projection_page
from pipeline.look.config import MapConfig
from pipeline.runs.folder import load_run
from pipeline.runs.mistakes import ERRORS_CSV, read_csv

log = logging.getLogger(__name__)
MAX_PCA_POINTS = 20_000
MAX_TSNE_POINTS = 3_000
SPLIT_MARKERS = {"train": "o", "val": "^", "test": "s"}


def _rows(cache: Cache, pool: str | None, limit: int, seed: int):
    """(features, labels, split per row, paths) of every split, a seeded sample of `limit` rows when there are more."""
    rows = cache.all_rows(pool or "avg")
    X, y, splits, paths = rows.features, rows.labels, rows.splits, np.array(rows.paths, dtype=object)
    if len(X) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), limit, replace=False))
        log.info("drawing %d of %d rows (seed %d)", limit, len(X), seed)
        X, y, splits, paths = X[keep], y[keep], splits[keep], paths[keep]
    return X, y, splits, paths


def project(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(n, 2) coordinates: PCA of the standardised rows, or t-SNE of their first 50 principal components."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(Z)
    from sklearn.manifold import TSNE

    Z = PCA(n_components=min(50, *Z.shape), random_state=seed).fit_transform(Z)
    return TSNE(n_components=2, init="pca", perplexity=min(30.0, max(2.0, (len(Z) - 1) / 3)),
                random_state=seed).fit_transform(Z)


def draw(cfg: MapConfig) -> list[Path]:
    """Write the map of `cfg.features` (and `cfg.run`'s mistakes) to `cfg.png_path` and/or the page `cfg.html`."""
    inputs = (cfg.features,) + ((cfg.run,) if cfg.run else ())
    if cfg.png_path:
        files.ensure_writable_file(cfg.png_path, "--out", inputs=inputs, output=files.IMAGE, force=cfg.force)
    if cfg.html:
        files.ensure_writable_file(cfg.html, "--html", inputs=inputs, output=files.HTML, force=cfg.force)
    run, pool, wrong = _run_parts(cfg)
    with open_cache(cfg.features) as cache:
        if run is not None:
            run.check_features(cache.header, cfg.features)
        limit = MAX_TSNE_POINTS if cfg.method == "tsne" else MAX_PCA_POINTS
        X, y, splits, paths = _rows(cache, pool, min(limit, projection_page.MAX_POINTS) if cfg.html else limit, cfg.seed)
        names, root = cache.header.class_names, cache.header.source.root
    if len(X) < 3:
        raise UserError(f"{cfg.features} holds {len(X)} rows: a map needs 3 at least")
    xy = project(X, cfg.method, cfg.seed)
    title, written = f"{Path(cfg.features).name}: {cfg.method.upper()} of {len(xy)} images", []
    if cfg.png_path:
        from pipeline.look.plots import save

        missed = np.array([p in wrong for p in paths], bool)
        written.append(save(map_figure(xy, y, splits, missed, names, title), cfg.png_path, 110))
    if cfg.html:
        page = projection_page.page(xy, y, splits, paths, names, wrong, Path(root) if root else None, title)
        Path(cfg.html).write_text(page, encoding="utf-8")
        written.append(Path(cfg.html))
    return written


def _run_parts(cfg: MapConfig):
    """The run, the pooling its head used, and its mistakes (path -> the wrong prediction); (None, None, {})
    without --run."""
    if cfg.run is None:
        return None, None, {}
    run = load_run(cfg.run)
    if not (run.folder / ERRORS_CSV).is_file():
        log.warning("%s has no %s (an older vggcache trained it): no mistakes to ring", run.folder, ERRORS_CSV)
    return run, run.record.pool, {m.path: m.predicted for m in read_csv(run.folder)}


def map_figure(xy, y, splits, missed, names: list[str], title: str):
    """The points coloured by class, one marker per split, mistakes ringed; the legend beside the plot."""
    from matplotlib.lines import Line2D

    from pipeline.look.plots import pyplot, shortened

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9.5, 6.5), constrained_layout=True)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    size = 30 if len(xy) <= 2000 else 8
    marker = lambda split: SPLIT_MARKERS.get(split, "D")
    for split in sorted(set(splits)):
        sel = splits == split
        ax.scatter(*xy[sel].T, s=size, c=[cmap(c % cmap.N) for c in y[sel]], marker=marker(split), alpha=0.7, linewidths=0)
    handles = [Line2D([], [], marker="o", linestyle="", color=cmap(c % cmap.N), label=printable(name))
               for c, name in enumerate(names)]
    handles += [Line2D([], [], marker=marker(split), linestyle="", color="grey", label=f"split {printable(split)}")
                for split in sorted(set(splits))]
    if missed.any():
        ax.scatter(*xy[missed].T, s=size * 4, facecolors="none", edgecolors="red", linewidths=1.2)
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="red",
                              markersize=9, label=f"misclassified by the run ({int(missed.sum())})"))
    ax.set_title(shortened(printable(title), 6.0, 10), fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for h in handles:
        h.set_label(shortened(h.get_label(), 1.6, 7))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              ncol=1 + len(handles) // 28)
    return fig
