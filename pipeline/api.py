"""The Python API: what the CLI does, as functions a notebook or a batch job calls (the CLI's extract and
train-head call these very functions; its other commands call the same library functions these do).

    import pipeline
    cache = pipeline.open_cache("features/flowers-8986e056ce97.h5")
    X, y, paths = cache.load("train", pool="avg")          # numpy; a map cache pooled at head time
    run = pipeline.train_head(cache.path, head="logreg")   # the options of `train-head`, by their CLI names
    run.predict_images(["a.jpg", "b.jpg"])                  # rows as `predict` writes them
    run.predict_features(X[:5])                             # probabilities from cached rows

Importing `pipeline` imports none of this (nor torch): each name is loaded on first use, and torch only when
images go through the model.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import store
from pipeline.extraction.config import ExtractConfig, flip_option, scales_option
from pipeline.heads.config import HeadConfig
from pipeline.runs import folder
from pipeline.train.config import TrainConfig

HEAD_OPTIONS = {"head": "kind", "patience": "patience", "early_stop_fraction": "validation_fraction"}
TRAIN_OPTIONS = ("out", "train_split", "val_split", "test_split", "val_fraction", "memory_budget", "stream", "pool",
                 "refit", "views", "models_dir", "track", "force")


class Run(folder.Run):
    """A saved run (runs.folder.Run: `metrics`, `record`, `class_names`, `predict_features(X)`) that also predicts
    image files: what `load_run` and `train_head` return."""

    def predict_images(self, paths, top_k: int = 3, **options) -> list[dict]:
        """`predict` on an image file or folder, or a list of them (options: weights, batch_size, workers, device,
        precision): one row per image, as the CSV has them (`proba` holds every class's probability)."""
        from pipeline.serve.config import PredictConfig
        from pipeline.serve.predict import predict

        # checked and made Paths by PredictConfig
        return predict(PredictConfig(run=self.folder, images=_paths(paths), top_k=top_k, **options), quiet=True)


def _paths(given) -> tuple:
    """One path (a str, bytes or path-like: one path, not its characters) or several, as a tuple."""
    import os

    return (given,) if isinstance(given, (str, bytes, os.PathLike)) else tuple(given)


def _api(run: folder.Run) -> Run:
    return Run(run.folder, run.record, run.metrics)


def open_cache(path) -> store.Cache:
    """A feature cache, opened and validated: `class_names`, `config`, `splits`, `load(split, pool=None)`.
    Use it in a `with` block, or close() it."""
    return store.open_cache(Path(path))


def load_run(path) -> Run:
    """A run folder: `metrics`, `record`, `class_names`, `predict_images(paths)`, `predict_features(X)`."""
    return _api(folder.load_run(Path(path)))


def extract(data, **options):
    """`pipeline extract DATA [options]`: the options by their CLI names (`views="flip"`, `scales="256,384"`,
    `weights="imagenet"`...); returns the summary the CLI prints (an ExtractSummary)."""
    from pipeline.extraction.runner import extract as run_extract

    return run_extract(extract_config(data, **options))


def extract_config(data, views: str = "none", scales: str = "", **options) -> ExtractConfig:
    """The ExtractConfig of CLI-named options (`views`, `scales` as the CLI spells them)."""
    return ExtractConfig(data=data, flip=flip_option(views), scales=scales_option(scales), **options)


def train_head(features, **options) -> Run:
    """`pipeline train-head FEATURES [options]`: the options by their CLI names (`head="linear"`, `C=1.0`,
    `patience=5`, `pool="auto"`...); returns the saved run (its metrics are what the CLI prints)."""
    from pipeline.train.runner import train_head as run_train

    return _api(run_train(train_config(features, **options)))


def train_config(features, **options) -> TrainConfig:
    """The TrainConfig of CLI-named options: those of the head go to its HeadConfig."""
    train = {name: options.pop(name) for name in TRAIN_OPTIONS if name in options}
    head = HeadConfig(**{HEAD_OPTIONS.get(name, name): value for name, value in options.items()})
    return TrainConfig(features=Path(features), head=head, **train)


def export_features(features, out, **options):
    """`pipeline export-features FEATURES --out DIR [options]`: the cache's rows as Parquet (hub/parquet.py);
    options by their CLI names (`pool="avg"`, `splits=("train",)`, `part_mb=128`, `force=True`)."""
    from pipeline.hub.config import ExportConfig
    from pipeline.hub.parquet import export_features as run_export

    return run_export(ExportConfig(features=Path(features), out=Path(out), **options))


def similar(features, queries, **options):
    """`pipeline similar FEATURES QUERY...`: the nearest cached images to each query (an image file, or a path in
    the cache), from an index kept beside the cache (hub/similar.py); options by their CLI names (`k=10`,
    `splits=("train",)`, `out="n.csv"`, `html="n.html"`)."""
    import os

    from pipeline.hub.config import SimilarConfig
    from pipeline.look.similar_page import similar as run_similar

    return run_similar(SimilarConfig(features=Path(features), queries=tuple(map(os.fsdecode, _paths(queries))),
                                     **options))


def preprocess(image, run: folder.Run | str | Path):
    """An image (a path, bytes or a PIL image) as the run's model takes it: decoded, upright, RGB, resized and
    centre-cropped exactly as `extract` does; a uint8 tensor (3, S, S) (what an exported model takes, batched)."""
    from PIL import Image

    from pipeline.extraction.reader import preprocess as crop
    from pipeline.images import open_image, read_image_file, to_rgb

    fcfg = (run if isinstance(run, folder.Run) else load_run(run)).feature_config
    if isinstance(image, Image.Image):
        from PIL import ImageOps

        return crop(to_rgb(ImageOps.exif_transpose(image)), fcfg.resize_size, fcfg.image_size)
    data = image if isinstance(image, bytes) else read_image_file(image)
    return crop(open_image(data, fcfg.resize_size), fcfg.resize_size, fcfg.image_size)


def is_demo_folder(root: Path) -> bool:
    """A folder that holds only what make_demo_data writes: <split>/<shape>/<nnnnn>.jpg, as real folders and regular
    files (a link is not followed: what it leads to is not the demo's to delete)."""
    import os
    import re

    from pipeline.synthetic import SHAPES

    split, shape = "(train|val|test)", f"({'|'.join(map(re.escape, SHAPES))})"
    folder, image = re.compile(rf"{split}(/{shape})?"), re.compile(rf"{split}/{shape}/\d{{5}}\.jpg")
    for dirpath, dirnames, filenames in os.walk(root):  # links to folders are listed, not entered
        rel = Path(dirpath).relative_to(root)
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)) or not folder.fullmatch((rel / name).as_posix()):
                return False
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path) or not image.fullmatch((rel / name).as_posix()):
                return False
    return True


def make_demo_data(out: Path, per_class: dict[str, int], seed: int = 0, force: bool = False) -> Path:
    """`pipeline make-demo-data`: generated shapes in a new or empty folder, or (force) over demo data made before
    (its files only: `is_demo_folder` found nothing else)."""
    from pipeline import files
    from pipeline.synthetic import make_image_folder

    if files.ensure_output_folder(Path(out), "OUT", is_demo_folder, "demo data", force):
        for p in sorted(Path(out).rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    return make_image_folder(out, per_class, size=(96, 72), seed=seed)
