"""Pictures to look at: errors.png and errors.csv in every run, the projection, and predict --report (drift)."""

import csv
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import needs_chromium, not_blank, render, rendered_without_errors
from conftest import extract_config, read_header, read_split
from PIL import Image

from pipeline.cache.store import open_cache
from pipeline.errors import UserError
from pipeline.extraction.runner import extract
from pipeline.heads.config import HeadConfig
from pipeline.heads.registry import full_proba
from pipeline.look import drift
from pipeline.look.config import ProjectionConfig
from pipeline.look.gallery import COLUMNS, MAX_SHOWN, sheet_figure, write_sheet
from pipeline.look.plots import shortened
from pipeline.look.projection import draw, figure, project_cache
from pipeline.runs.folder import ERRORS_PNG
from pipeline.runs.mistakes import ERRORS_CSV, Mistake, read_csv, write_csv
from pipeline.runs.reference import REFERENCE_FILE, distances
from pipeline.runs.reference import compute as reference
from pipeline.serve.config import PredictConfig
from pipeline.serve.predict import predict
from pipeline.synthetic import make_image_folder
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head

CLI = [sys.executable, "-m", "pipeline"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with mistakes on val and test: few training images, random weights."""
    root = tmp_path_factory.mktemp("look")
    data = make_image_folder(root / "data", {"train": 6, "val": 5, "test": 5}, size=(40, 36), seed=3)
    cache = extract(extract_config(data, root / "f.h5")).out
    run = train_head(TrainConfig(features=cache, out=root / "run", head=HeadConfig("logreg", C=0.01)))
    return data, cache, run


def png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # a truncated file fails here
        return img.size


def test_errors_csv_lists_exactly_the_misclassified_rows(trained):
    _, cache, run = trained
    head = run.load_head()
    with open(run.folder / ERRORS_CSV, newline="") as f:
        listed = {(r["split"], r["path"], r["predicted"]) for r in csv.DictReader(f)}
    names, wrong = read_header(cache).class_names, set()
    for split in ("val", "test"):
        data = read_split(cache, split)
        predicted = full_proba(head if split == "test" else _val_head(run, head), data.features, 3).argmax(1)
        wrong |= {(split, p, names[k]) for p, k, y in zip(data.paths, predicted, data.labels) if k != y}
    assert wrong and listed == wrong


def _val_head(run, head):
    """Val is scored by the head fitted on train, test by the one refit on train + val: refit val's head here."""
    assert run.record.refit  # the fixture has a test split
    from pipeline.heads.registry import make_head

    cache = open_cache(run.record.features.path)
    return make_head("logreg", **run.record.head.params).fit(cache.read_split("train").features,
                                                              cache.read_split("train").labels)


def test_errors_png_is_a_sheet_of_the_mistakes(trained):
    _, _, run = trained
    found = read_csv(run.folder)
    n = len(found)
    cols = min(COLUMNS, n)
    rows = -(-min(n, MAX_SHOWN) // cols)
    assert png_size(run.folder / ERRORS_PNG) == (round(1.9 * cols * 100), round((2.2 * rows + 0.4) * 100))
    fig = sheet_figure(found[:MAX_SHOWN], None, "t")  # what the sheet shows: each mistake, its truth and prediction
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == min(n, MAX_SHOWN)
    for m, title in zip(found, titles):
        assert f"{m.split}: {Path(m.path).name}" in title and f"true {m.true}" in title and f"pred {m.predicted}" in title


def write_errors(folder, found, image_root, title):
    """errors.csv and errors.png, as train-head writes them into a run folder."""
    write_csv(folder, found)
    write_sheet(folder / ERRORS_PNG, found, image_root, title)


def test_a_missing_image_is_a_placeholder_not_a_crash(tmp_path):
    found = [Mistake("val", "gone.jpg", "a", "b", 0.9), Mistake("val", "../../etc/passwd", "a", "b", 0.8)]
    write_errors(tmp_path, found, tmp_path, "t")
    assert png_size(tmp_path / ERRORS_PNG) == (380, 260)


def test_no_mistakes_is_still_a_sheet(tmp_path):
    write_errors(tmp_path, [], None, "t")
    assert png_size(tmp_path / ERRORS_PNG) == (190, 260)
    assert (tmp_path / ERRORS_CSV).read_text().splitlines() == ["split,path,true,predicted,probability"]


def test_errors_csv_quotes_formulas_and_reads_every_name_back(tmp_path):
    found = [Mistake("val", "=1+1.jpg", "@home", "-minus", 0.9), Mistake("test", "'quoted.jpg", "'a", "plain", 0.8)]
    write_csv(tmp_path, found)
    assert (tmp_path / ERRORS_CSV).read_text().splitlines()[1:] == ["val,'=1+1.jpg,'@home,'-minus,0.9000",
                                                                    "test,''quoted.jpg,''a,plain,0.8000"]
    assert read_csv(tmp_path) == found


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_the_projection_is_a_png_with_the_runs_mistakes_ringed(trained, tmp_path, method):
    _, cache, run = trained
    cfg = ProjectionConfig(cache, run=run.folder, method=method, out=tmp_path / "m.png")
    out = draw(cfg)[0]
    assert png_size(out) == (1045, 715)
    projected, mistakes = project_cache(cfg), read_csv(run.folder)
    fig = figure(projected)
    ringed = [c for c in fig.axes[0].collections if len(c.get_facecolors()) == 0]  # hollow markers: the rings
    assert len(ringed) == 1 and len(ringed[0].get_offsets()) == len(mistakes) > 0
    at = {tuple(xy) for xy in np.round(np.asarray(ringed[0].get_offsets(), np.float64), 4)}
    assert at == {tuple(xy) for xy in np.round(np.asarray(projected.xy[projected.missed], np.float64), 4)}  # exactly the mistakes' points
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [shortened(label, 1.6, 7) for label in (*projected.class_names, "split test", "split train",
                                                              "split val", f"misclassified by the run ({len(mistakes)})")]


def test_the_projection_refuses_a_run_of_other_features(trained, tmp_path, image_folder):
    _, _, run = trained
    other = extract(extract_config(image_folder, tmp_path / "o.h5", pool="max")).out
    with pytest.raises(UserError, match="was trained on features"):
        draw(ProjectionConfig(other, run=run.folder, out=tmp_path / "m.png"))


def test_drift_verdict_on_the_same_and_on_a_shifted_distribution():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 16)) + np.repeat(np.eye(16)[:2] * 4, 300, axis=0)
    y = np.repeat([0, 1], 300)
    ref = reference(X[::2], y[::2], X[1::2], np.full(300, 0.9), 2)
    same, _ = drift.verdict(ref, distances(ref, X[1::2]), np.full(300, 0.9))
    shifted = rng.standard_normal((300, 16)) + np.eye(16)[5] * 4
    moved, line = drift.verdict(ref, distances(ref, shifted), np.full(300, 0.6))
    assert not same and moved and "do NOT look like the training data" in line


@pytest.mark.parametrize("n_new, drifted, says", [
    (1, False, "too few images to tell (1; need at least 3 against 300 validation images)"),
    (2, False, "too few images to tell (2; need at least 3 against 300 validation images)"),
    (3, True, "3 new images do NOT look like the training data"),
], ids=["one", "two", "three"])
def test_a_drift_verdict_needs_enough_images_to_decide(n_new, drifted, says):
    """On one or two images the KS critical value is above 1, the largest distance: no verdict can be reached, so
    none is given; from three images on, images far from everything are called drift."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 16)) + np.repeat(np.eye(16)[:2] * 4, 300, axis=0)
    y = np.repeat([0, 1], 300)
    ref = reference(X[::2], y[::2], X[1::2], np.full(300, 0.9), 2)
    far = np.full((n_new, 16), 40.0)
    verdict, line = drift.verdict(ref, distances(ref, far), np.full(n_new, 0.5))
    assert verdict == drifted and says in line


def test_the_drift_picture_shows_validation_against_the_new_images():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 16)) + np.repeat(np.eye(16)[:2] * 4, 300, axis=0)
    ref = reference(X[::2], np.repeat([0, 1], 150), X[1::2], np.full(300, 0.9), 2)
    d_new, confidence = distances(ref, rng.standard_normal((20, 16)) * 5), np.full(20, 0.6)
    fig = drift.figure(ref, d_new, confidence, "run: 20 new images do NOT look like the training data")
    assert [ax.get_xlabel() for ax in fig.axes] == ["cosine distance to the 5th nearest training image",
                                                    "confidence (top probability)"]
    assert all(sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["new images", "validation"]
               for ax in fig.axes)
    assert [line.get_xdata()[0] for line in fig.axes[0].lines] == [float(ref["distance_q95"])]  # 95% of validation
    assert "do NOT look like the training data" in fig._suptitle.get_text()


def test_predict_report_writes_one_line_and_a_png(trained, tmp_path, caplog):
    data, _, run = trained
    caplog.set_level(logging.INFO)
    predict(PredictConfig(run=run.folder, images=(data / "test",), out=tmp_path / "p.csv", report=True))
    assert png_size(tmp_path / "p.drift.png") == (1000, 400)
    assert "15 new images" in caplog.text and "against the 15 validation images" in caplog.text


def test_predict_report_without_a_reference_is_refused_up_front(trained, tmp_path):
    data, _, run = trained
    (run.folder / REFERENCE_FILE).rename(tmp_path / "kept.npz")
    try:
        with pytest.raises(UserError, match="keeps no reference of its training data"):
            predict(PredictConfig(run=run.folder, images=(data / "test",), out=tmp_path / "p.csv", report=True))
        assert not (tmp_path / "p.csv").exists()
    finally:
        (tmp_path / "kept.npz").rename(run.folder / REFERENCE_FILE)


@pytest.mark.parametrize("out, message", [
    ("m.csv", "--out 'OUT' is not valid (expected a file name ending in .png, .svg or .pdf)"),
    ("{run}/m.png", "would overwrite"),
    ("nowhere/m.png", "--out OUT: the folder"),
    ("cache.png", "exists and is an HDF5 file (a feature cache?): this command writes a PNG, SVG or PDF picture"),
    ("notes.png", "exists and is not a PNG, SVG or PDF picture"),
], ids=["not-a-picture", "in-the-run", "missing-folder", "a-cache", "another-file"])
def test_projection_refuses_an_out_it_cannot_or_must_not_write(trained, tmp_path, out, message):
    _, cache, run = trained
    target = out.format(run=run.folder) if "{" in out else str(tmp_path / out)
    if out == "cache.png":
        shutil.copy(cache, target)
    if out == "notes.png":
        Path(target).write_text("my notes")
    r = subprocess.run(CLI + ["projection", str(cache), "--run", str(run.folder), "--out", target], capture_output=True,
                       text=True)
    assert r.returncode == 2 and message.replace("OUT", target) in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (out != "notes.png" or Path(target).read_text() == "my notes")


def test_predict_never_writes_over_a_feature_cache(trained, tmp_path):
    data, cache, run = trained
    target = tmp_path / "copy.h5"
    shutil.copy(cache, target)
    with pytest.raises(UserError, match="exists and is an HDF5 file .*: this command writes a predictions CSV; choose "
                                        "another file, or pass --force to replace it"):
        predict(PredictConfig(run=run.folder, images=(data / "test",), out=target))
    assert target.read_bytes() == Path(cache).read_bytes()
    predict(PredictConfig(run=run.folder, images=(data / "test",), out=tmp_path / "p.csv"))
    predict(PredictConfig(run=run.folder, images=(data / "test",), out=tmp_path / "p.csv"))  # its own CSV: replaced


def _pickled(path: Path) -> None:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    Path(f"{path}.npy").replace(path)


@pytest.mark.parametrize("damage, message", [
    (lambda p, elsewhere: p.write_bytes(b"junk"), r"reference.npz is damaged \(.*\); retrain the run"),
    (lambda p, elsewhere: _pickled(p), r"reference.npz is damaged \(it is not a numpy archive of plain arrays\); "
                                       r"retrain the run"),
    (lambda p, elsewhere: p.symlink_to(elsewhere), "reference.npz is a symbolic link"),
], ids=["junk", "pickle", "symlink"])
def test_a_damaged_reference_is_one_line(trained, tmp_path, damage, message):
    data, _, run = trained
    (run.folder / REFERENCE_FILE).rename(tmp_path / "kept.npz")
    try:
        damage(run.folder / REFERENCE_FILE, tmp_path / "kept.npz")
        with pytest.raises(UserError, match=message) as caught:
            predict(PredictConfig(run=run.folder, images=(data / "test",), out=tmp_path / "p.csv", report=True))
        assert "allow_pickle" not in str(caught.value)
    finally:
        (run.folder / REFERENCE_FILE).unlink(missing_ok=True)
        (tmp_path / "kept.npz").replace(run.folder / REFERENCE_FILE)


def test_projection_cli_writes_beside_the_cache(trained):
    _, cache, _ = trained
    r = subprocess.run(CLI + ["projection", str(cache)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert png_size(f"{cache}.projection.png") == (1045, 715) and r.stderr == ""


def test_map_cli_is_the_old_name_of_projection_and_says_so(trained):
    _, cache, _ = trained
    r = subprocess.run(CLI + ["map", str(cache)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert png_size(f"{cache}.map.png") == (1045, 715)
    assert r.stderr.strip() == ("note: `pipeline map` is now `pipeline projection` (the same options); the old name "
                                "stays as an alias")


@needs_chromium
def test_the_report_page_renders_in_a_browser(trained, tmp_path):
    _, _, run = trained
    page = run.folder / "report.html"
    dom, pixels = render(page, tmp_path)
    assert rendered_without_errors(dom) and not_blank(pixels)
    assert run.folder.name in dom and "accuracy" in dom and "data:image/png;base64," in dom


@needs_chromium
def test_a_long_class_name_wraps_on_the_report_page(tmp_path):
    """A 200-character class name pushed the per-class columns off-screen; it wraps, and the page is no wider than
    the window (measured by the browser)."""
    data = make_image_folder(tmp_path / "data", {"train": 4, "val": 3}, size=(40, 36), seed=3)
    long = "vehicle_" + "x" * 192
    for split in ("train", "val"):
        (data / split / "circle").rename(data / split / long)
    cache = extract(extract_config(data, tmp_path / "f.h5")).out
    run = train_head(TrainConfig(features=cache, out=tmp_path / "run", head=HeadConfig("logreg", C=0.01)))
    page = tmp_path / "measured.html"
    page.write_text((run.folder / "report.html").read_text().replace(
        "</body>", "<script>document.body.dataset.wide = document.documentElement.scrollWidth + '/' + "
                   "window.innerWidth;</script></body>"))
    dom, _ = render(page, tmp_path, size=(1000, 800))
    wide, window = map(int, re.search(r'data-wide="(\d+)/(\d+)"', dom).groups())
    assert rendered_without_errors(dom) and long in dom and wide <= window == 1000


@needs_chromium
def test_the_interactive_projection_renders_hovers_and_filters_in_a_browser(trained, tmp_path):
    _, cache, run = trained
    page = draw(ProjectionConfig(cache, run=run.folder, html=tmp_path / "m.html"))[0]
    assert page == tmp_path / "m.html"
    with open_cache(cache) as c:
        rows = sum(c.split_shape(s)[0] for s in c.splits)
    selftest = tmp_path / "selftest.html"  # the same page, asked to hover a point and untick a class itself
    selftest.write_text(page.read_text().replace('location.hash === "#selftest"', "true"))
    dom, pixels = render(selftest, tmp_path)
    assert rendered_without_errors(dom) and 'data-selftest="passed"' in dom and not_blank(pixels)
    assert dom.count("<circle") + dom.count("<polygon") == rows and "data:image/jpeg;base64," in page.read_text()


def test_the_projection_page_shows_names_that_are_not_utf8_as_their_bytes():
    import os

    from pipeline.look import projection_page

    odd = os.fsdecode(b"caf\xe9")
    text = projection_page.page(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([0, 1]), np.array(["train", "val"]),
                         [f"{odd}/1.jpg", "b/2.jpg"], [odd, "b"], {f"{odd}/1.jpg": odd}, None, odd)
    assert text.encode("utf-8").count(b"caf\\\\xe9") >= 3  # path, class, wrong prediction (escaped once more by JSON)
