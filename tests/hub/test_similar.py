"""`pipeline similar`: a cached image finds itself first at 1.0, then its near-duplicates (those the audit
reports); the same image as a file meets its own row; --split, k, bad queries, the CSV and the page."""

import csv
import os
import shutil

import pytest
from conftest import extract_config
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.extraction.runner import extract
from pipeline.hub.config import SimilarConfig
from pipeline.hub.similar import Neighbour, QueryResult, similar, write_csv
from pipeline.look.audit import audit
from pipeline.look.config import AuditConfig
from pipeline.look.similar_page import page
from pipeline.look.similar_page import similar as similar_with_page
from pipeline.synthetic import make_image_folder

SOURCE, COPY = "train/checks/00001.jpg", "val/checks/resized.jpg"


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny image folder with a resized copy of a training image planted in val, and its cache."""
    root = tmp_path_factory.mktemp("similar")
    data = make_image_folder(root / "data", {"train": 4, "val": 2}, size=(40, 36))
    Image.open(data / SOURCE).resize((80, 72)).save(data / COPY, quality=95)
    shutil.copyfile(data / "train/circle/00000.jpg", root / "outside.jpg")  # an image file that is not a cached path
    return data, extract(extract_config(data, root / "f.h5")).out


def test_a_cached_image_is_first_at_one_then_its_audit_near_duplicate(cached, tmp_path):
    data, cache = cached
    near = audit(AuditConfig(cache, out=tmp_path / "a.csv")).near
    assert [(p.a.path, p.b.path) for p in near] == [(SOURCE, COPY)]
    (q,) = similar(SimilarConfig(cache, (SOURCE,), k=3)).results
    assert q.source == "cache" and [n.path for n in q.neighbours[:2]] == [SOURCE, COPY]
    assert q.neighbours[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert q.neighbours[1].similarity == pytest.approx(near[0].similarity, abs=1e-5)  # the audit's similarity


def test_the_same_image_as_a_file_meets_its_own_row(cached):
    data, cache = cached
    by_path, by_file = similar(SimilarConfig(cache, (SOURCE, str(data / SOURCE)), k=4)).results
    assert by_file.source == "file" and by_file.neighbours[0].path == SOURCE
    assert by_file.neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert [n.path for n in by_file.neighbours] == [n.path for n in by_path.neighbours]


def test_split_searches_only_its_rows(cached):
    _, cache = cached
    (q,) = similar(SimilarConfig(cache, (SOURCE,), k=3, splits=("val",))).results
    assert {n.split for n in q.neighbours} == {"val"} and q.neighbours[0].path == COPY


def test_k_above_the_rows_gives_every_row_once(cached):
    _, cache = cached
    (q,) = similar(SimilarConfig(cache, (SOURCE,), k=500)).results
    assert len(q.neighbours) == 19 and len({n.path for n in q.neighbours}) == 19  # 12 train + 6 val + the copy
    sims = [n.similarity for n in q.neighbours]
    assert sims == sorted(sims, reverse=True)


@pytest.mark.parametrize("query, says", [
    ("train/nope.jpg", "neither a path in"),
    ("notes.txt", "is not an image"),
    ("folder", "is not an image this tool reads (not a regular file (a folder))"),
    ("pipe.jpg", "is not an image this tool reads (not a regular file (a FIFO))"),
], ids=["unknown", "not-an-image", "a-folder", "a-fifo"])
def test_a_bad_query_is_one_line_before_any_work(cached, tmp_path, monkeypatch, query, says):
    _, cache = cached
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("=1+1")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")
    result = CliRunner().invoke(app, ["similar", str(cache), SOURCE, query])
    assert result.exit_code == 2 and says in result.output and len(result.output.strip().splitlines()) == 1


def test_the_cli_prints_a_table_and_writes_the_csv(cached, tmp_path):
    _, cache = cached
    out = tmp_path / "n.csv"
    result = CliRunner().invoke(app, ["similar", str(cache), SOURCE, "--k", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"1   1.0000  {SOURCE}" in result.output and "index: exact" in result.output
    rows = list(csv.DictReader(open(out, newline="")))
    assert [(r["rank"], r["path"]) for r in rows] == [("1", SOURCE), ("2", COPY)]


def test_out_replaces_only_a_similar_csv(cached, tmp_path):
    _, cache = cached
    notes = tmp_path / "notes.csv"
    notes.write_text("name,amount\n")
    with pytest.raises(UserError, match="not a similar CSV"):
        similar(SimilarConfig(cache, (SOURCE,), out=notes))
    assert notes.read_text() == "name,amount\n"


def test_the_csv_quotes_names_a_spreadsheet_would_evaluate(tmp_path):
    q = QueryResult("=HYPERLINK(\"x\")", "file", (Neighbour("train", "+cmd.jpg", "@label", 0.5),))
    write_csv([q], tmp_path / "n.csv")
    (row,) = list(csv.reader(open(tmp_path / "n.csv", newline="")))[1:]
    assert row == ["'=HYPERLINK(\"x\")", "file", "1", "0.500000", "train", "'+cmd.jpg", "'@label"]


def test_the_page_escapes_every_name(tmp_path):
    evil = '<script>alert(1)</script>"onerror=x.jpg'
    q = QueryResult(evil, "cache", (Neighbour("train", evil, "<b>ants</b>", 0.9),))
    html = page([q], tmp_path, "t")
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;ants" in html
    assert "not found" in html  # images missing from the root: placeholders


def test_the_page_shows_the_thumbnails_of_the_query_and_its_neighbours(cached, tmp_path):
    data, cache = cached
    r = similar_with_page(SimilarConfig(cache, (SOURCE,), k=2, html=tmp_path / "n.html"))
    html = (tmp_path / "n.html").read_text()
    assert r.written == (tmp_path / "n.html",) and html.count("data:image/jpeg;base64,") == 3
    assert "default-src 'none'" in html
