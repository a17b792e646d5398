"""`pipeline projection`: the cache's embeddings in two dimensions, coloured by class, one marker per split, and,
given a run, its mistakes ringed: clusters, outliers and overlapping classes at a glance. A picture (`figure`), an
interactive page (projection_page.py), or both.

PCA (scikit-learn, any number of rows: a seeded sample of at most MAX_PCA_POINTS is drawn) or t-SNE (on at most
MAX_TSNE_POINTS rows, after PCA to 50 dimensions, as its authors advise). A map cache is average-pooled first, or
pooled as the run's head pools it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.cache.store import Cache, open_cache
from pipeline.errors import UserError
from pipeline.look import projection_page
from pipeline.look.config import ProjectionConfig
from pipeline.runs.folder import load_run
from pipeline.runs.mistakes import ERRORS_CSV, read_csv
from pipeline.text import printable

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


@dataclass(frozen=True)
class Projection:
    """The cache's rows (or a sample of them) in two dimensions, with what is drawn of each."""

    xy: np.ndarray  # (n, 2)
    labels: np.ndarray
    splits: np.ndarray
    paths: np.ndarray
    class_names: list[str]
    wrong: dict[str, str]  # path -> the run's wrong prediction ({} without a run)
    image_root: Path | None  # the dataset the paths are relative to (thumbnails)
    title: str

    @property
    def missed(self) -> np.ndarray:
        """Which rows the run got wrong."""
        return np.array([p in self.wrong for p in self.paths], bool)


def project_cache(cfg: ProjectionConfig, limit: int | None = None) -> Projection:
    """The projection of `cfg.features` (at most `limit` rows, a seeded sample), with `cfg.run`'s mistakes."""
    run, pool, wrong = _run_parts(cfg)
    with open_cache(cfg.features) as cache:
        if run is not None:
            run.check_features(cache.header, cfg.features)
        most = MAX_TSNE_POINTS if cfg.method == "tsne" else MAX_PCA_POINTS
        X, y, splits, paths = _rows(cache, pool, min(most, limit or most), cfg.seed)
        names, root = cache.header.class_names, cache.header.source.root
    if len(X) < 3:
        raise UserError(f"{cfg.features} holds {len(X)} rows: a projection needs 3 at least")
    xy = project(X, cfg.method, cfg.seed)
    return Projection(xy, y, splits, paths, names, wrong, Path(root) if root else None,
                      f"{Path(cfg.features).name}: {cfg.method.upper()} of {len(xy)} images")


def draw(cfg: ProjectionConfig) -> list[Path]:
    """Write the projection of `cfg.features` (and `cfg.run`'s mistakes) to `cfg.png_path` and/or the page
    `cfg.html`."""
    inputs = (cfg.features,) + ((cfg.run,) if cfg.run else ())
    if cfg.png_path:
        files.ensure_writable_file(cfg.png_path, "--out", inputs=inputs, output=files.IMAGE, force=cfg.force)
    if cfg.html:
        files.ensure_writable_file(cfg.html, "--html", inputs=inputs, output=files.HTML, force=cfg.force)
    p = project_cache(cfg, projection_page.MAX_POINTS if cfg.html else None)
    written = []
    if cfg.png_path:
        from pipeline.look.plots import save

        written.append(save(figure(p), cfg.png_path, 110))
    if cfg.html:
        page = projection_page.page(p.xy, p.labels, p.splits, p.paths, p.class_names, p.wrong, p.image_root, p.title)
        Path(cfg.html).write_text(page, encoding="utf-8")
        written.append(Path(cfg.html))
    return written


def _run_parts(cfg: ProjectionConfig):
    """The run, the pooling its head used, and its mistakes (path -> the wrong prediction); (None, None, {})
    without --run."""
    if cfg.run is None:
        return None, None, {}
    run = load_run(cfg.run)
    if not (run.folder / ERRORS_CSV).is_file():
        log.warning("%s has no %s (an older vggcache trained it): no mistakes to ring", run.folder, ERRORS_CSV)
    return run, run.record.pool, {m.path: m.predicted for m in read_csv(run.folder)}


def figure(p: Projection):
    """The points coloured by class, one marker per split, mistakes ringed; the legend beside the plot."""
    return points_figure(p.xy, p.labels, p.splits, p.missed, p.class_names, p.title)


def points_figure(xy, y, splits, missed, names: list[str], title: str):
    """`figure` of plain arrays: (n, 2) points, their labels and splits, which were missed, the class names."""
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
