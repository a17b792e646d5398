"""From a run folder to production: the exported model file equals `predict` (every head kind, both formats), the
server answers concurrent requests with predict's values and every bad input with a 4xx JSON error, and the Python
API gives what the CLI gives."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, extract_config
from PIL import Image
from typer.testing import CliRunner

from pipeline import api
from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.extraction.runner import extract
from pipeline.heads.config import HeadConfig
from pipeline.synthetic import make_image_folder
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head

FAST = {"linear": dict(epochs=3, lr=1e-2, weight_decay=1e-4, device="cpu"), "logreg": dict(C=1.0, device="cpu"),
        "knn": dict(k=3), "block5": dict(epochs=1, device="cpu")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A small image set, its caches (avg; a pool5 map; a pool4 map) and a run of every head kind."""
    root = tmp_path_factory.mktemp("deploy")
    data = make_image_folder(root / "data", {"train": 6, "val": 3, "test": 3}, size=(48, 40))
    avg = extract(extract_config(data, root / "avg.h5")).out
    pool5 = extract(extract_config(data, root / "map.h5", pool="map", image_size=64)).out
    pool4 = extract(extract_config(data, root / "pool4.h5", pool="map", layer="pool4")).out
    made = {kind: train_head(TrainConfig(features=avg, out=root / kind, head=HeadConfig(kind=kind, **FAST[kind])))
            for kind in ("logreg", "linear", "knn")}
    made["block5"] = train_head(TrainConfig(features=pool4, out=root / "block5",
                                            head=HeadConfig(kind="block5", **FAST["block5"])))
    made["logreg-spp"] = train_head(TrainConfig(features=pool5, out=root / "logreg-spp", pool="spp",
                                                head=HeadConfig(**FAST["logreg"])))
    return data, {kind: api.load_run(run.folder) for kind, run in made.items()}  # runs that predict images


def _images(data: Path, run) -> tuple[list[Path], torch.Tensor]:
    paths = sorted((data / "test").rglob("*.jpg"))
    return paths, torch.stack([api.preprocess(p, run) for p in paths])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("kind", ["logreg", "linear", "knn", "block5", "logreg-spp"])
def test_an_exported_model_gives_predicts_probabilities(runs, tmp_path, kind, fmt):
    data, made = runs
    run = made[kind]
    out = tmp_path / f"model.{fmt}"
    result = CliRunner().invoke(app, ["export", str(run.folder), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    paths, images = _images(data, run)
    expected = np.stack([row["proba"] for row in run.predict_images(paths, precision="fp32")])
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": images.numpy()})[0]
        meta = session.get_modelmeta().custom_metadata_map
    else:
        extra = {"vggcache.json": ""}
        module = torch.jit.load(str(out), _extra_files=extra)
        got = module(images).numpy()
        meta = json.loads(extra["vggcache.json"])
    assert got.shape == (len(paths), 3) and np.abs(got - expected).max() <= 1e-4
    assert json.loads(meta["vggcache.class_names"]) == run.class_names and meta["vggcache.fingerprint"] == run.fingerprint


def test_export_refuses_to_write_over_what_it_did_not_make(runs, tmp_path):
    _, made = runs
    notes = tmp_path / "notes.onnx"
    notes.write_text("mine")
    result = CliRunner().invoke(app, ["export", str(made["logreg"].folder), "--out", str(notes)])
    assert result.exit_code == 2 and "exists and is not an onnx model file" in result.output
    assert notes.read_text() == "mine"


# --- the server -----------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`pipeline serve` on a free port of 127.0.0.1, a 1 MB request limit, its log in a file; stopped at the end."""
    _, made = runs
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", str(made["logreg"].folder), "--port",
                                 str(port), "--max-request-mb", "1", "--device", "cpu"], stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
    made["logreg"].server_log = log
    yield url, made["logreg"]
    proc.terminate()
    proc.wait(timeout=30)


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "vggcache-test-boundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(url: str, files: list[tuple[str, bytes]] | None = None, body: bytes | None = None, path="/predict",
          content_type: str | None = None, method: str = "POST") -> tuple[int, dict]:
    if files is not None:
        body, content_type = _multipart(files)
    request = urllib.request.Request(url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_requests_get_predicts_values(runs, server):
    data, _ = runs
    url, run = server
    paths = sorted((data / "test").rglob("*.jpg"))
    expected = {row["path"]: row for row in run.predict_images(paths)}
    results, errors = {}, []

    def client(i: int):
        chosen = paths[i % len(paths):][:1 + i % 3]
        status, body = _post(url, [(f"{i}-{p.name}", p.read_bytes()) for p in chosen])
        if status != 200:
            errors.append((status, body))
            return
        for p, result in zip(chosen, body["results"]):
            results[(i, str(p))] = result

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == sum(len(paths[i % len(paths):][:1 + i % 3]) for i in range(12))
    for (_, path), result in results.items():
        row = expected[path]
        assert result["predicted"] == row["predicted"] and abs(result["probability"] - float(row["probability"])) < 1e-4
        assert [c["class"] for c in result["top_k"]] == [c.split(":")[0] for c in row["top_k"].split(";")]


def _chunked(files: list[tuple[str, bytes]]) -> dict:
    """A body sent chunked (no Content-Length): the server can only count what it reads."""
    body, content_type = _multipart(files)
    return {"body": (body[i:i + 65536] for i in range(0, len(body), 65536)), "content_type": content_type}


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, "PNG")  # 100 Mpx: over Pillow's limit (89.5), a tiny file
    return buffer.getvalue()


def _strip() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 1)).save(buffer, "JPEG")  # a 1 KB JPEG that resizing would make 2 Mpx long
    return buffer.getvalue()


def _truncated(data: Path) -> bytes:
    return next((data / "test").rglob("*.jpg")).read_bytes()[:200]


@pytest.mark.parametrize("request_of, status, says", [
    (lambda d: {"files": [("a.txt", b"just text")]}, 422, "a.txt is not an image this server can read"),
    (lambda d: {"files": [("t.jpg", _truncated(d))]}, 422, "t.jpg is not an image this server can read"),
    (lambda d: {"files": [("zero.jpg", b"")]}, 422, "zero.jpg is not an image this server can read (empty file"),
    (lambda d: {"files": [("bomb.png", _bomb())]}, 422, "over Pillow's decompression-bomb limit"),
    (lambda d: {"files": [("cat.jpg", b"%!PS-Adobe-3.0\n{} loop\n")]}, 422,
     "cat.jpg is not an image this server can read (not a JPEG, PNG, BMP, GIF, TIFF or WebP image (23 bytes))"),
    (lambda d: {"files": [("strip.jpg", _strip())]}, 422, "strip.jpg is not an image this server can read (8000x1 px"),
    (lambda d: {"files": [("big.jpg", b"x" * (2 << 20))]}, 413, "request larger than --max-request-mb (1 MB)"),
    (lambda d: _chunked([("big.jpg", b"x" * (2 << 20))]), 413, "request larger than --max-request-mb (1 MB)"),
    (lambda d: {"files": []}, 422, "no file"),
    (lambda d: {"body": b"{}", "content_type": "application/json"}, 422, "no file"),
    (lambda d: {"path": "/nope", "method": "GET"}, 404, "Not Found"),
    (lambda d: {"path": "/predict", "method": "GET"}, 405, "Method Not Allowed"),
], ids=["text", "truncated", "zero-bytes", "bomb", "postscript", "strip", "too-large", "too-large-chunked", "no-file", "not-multipart", "unknown-route",
        "wrong-method"])
def test_every_bad_input_is_a_4xx_json_error_and_the_server_goes_on(runs, server, request_of, status, says):
    data, _ = runs
    url, _ = server
    got, body = _post(url, **request_of(data))
    assert got == status and says in body["error"]
    assert _post(url, path="/health", method="GET") == (200, {"status": "ok"})


def test_results_carry_predicts_distance_columns(runs, server):
    data, _ = runs
    url, run = server
    paths = sorted((data / "test").rglob("*.jpg"))[:3]
    expected = run.predict_images(paths)
    status, body = _post(url, [(p.name, p.read_bytes()) for p in paths])
    assert status == 200
    for result, row in zip(body["results"], expected):
        assert result["distance_percentile"] == pytest.approx(float(row["distance_percentile"]), abs=0.051)
        assert result["unusual"] == (row["unusual"] == "yes")


def test_head_is_answered_where_get_is(server):
    url, _ = server
    for path in ("/health", "/info"):
        with urllib.request.urlopen(urllib.request.Request(url + path, method="HEAD"), timeout=10) as response:
            assert response.status == 200 and response.read() == b""


def test_more_files_than_a_request_may_hold_is_a_413(server):
    from pipeline.serve.server import MAX_FILES

    url, _ = server
    status, body = _post(url, [(f"{i}.png", b"x") for i in range(MAX_FILES + 1)])
    assert status == 413 and body["error"] == f"more than {MAX_FILES} files in one request: send them in several"


def test_a_client_gone_mid_upload_is_one_log_line(server):
    url, run = server
    port = int(url.rsplit(":", 1)[1])
    body, content_type = _multipart([("a.jpg", b"x" * 50_000)])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:20_000])
    deadline = time.time() + 10
    while time.time() < deadline and run.server_log.read_text().count("went away") < 3:
        time.sleep(0.1)
    text = run.server_log.read_text()
    assert text.count("went away during its upload") == 3 and "Traceback" not in text, text[-3000:]
    assert _post(url, path="/health", method="GET") == (200, {"status": "ok"})


def test_info_names_the_run(server):
    url, run = server
    status, info = _post(url, path="/info", method="GET")
    assert status == 200 and info["classes"] == run.class_names and info["fingerprint"] == run.fingerprint
    assert info["run"] == run.record.name and info["crop_size"] == SIZE and "torch" in info["versions"]


# --- the Python API -------------------------------------------------------------------------------------------------

def test_the_api_gives_what_the_cli_gives(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 4, "val": 2}, size=(40, 36))
    options = ["--weights", "none", "--image-size", str(SIZE), "--precision", "fp32", "--workers", "0"]
    assert CliRunner().invoke(app, ["extract", str(data), "--out", str(tmp_path / "cli.h5"), *options]).exit_code == 0
    summary = api.extract(data, out=tmp_path / "api.h5", weights="none", image_size=SIZE, precision="fp32", workers=0)
    with api.open_cache(tmp_path / "cli.h5") as cli, api.open_cache(summary.out) as ours:
        X, y, paths = ours.load("train")
        assert np.array_equal(X, cli.load("train").features) and paths == cli.load("train").paths
        assert ours.config == cli.config and ours.class_names == cli.class_names
    result = CliRunner().invoke(app, ["train-head", str(summary.out), "--head", "linear", "--epochs", "2", "--patience",
                                      "1", "--device", "cpu", "--out", str(tmp_path / "cli-run")])
    assert result.exit_code == 0, result.output
    run = api.train_head(summary.out, head="linear", epochs=2, patience=1, device="cpu", out=tmp_path / "api-run")
    cli_run = api.load_run(tmp_path / "cli-run")
    assert run.metrics == cli_run.metrics and run.record.head == cli_run.record.head
    np.testing.assert_array_equal(run.predict_features(X), cli_run.predict_features(X))


def test_predict_images_takes_one_path_as_a_string(runs):
    data, made = runs
    path = sorted((data / "test").rglob("*.jpg"))[0]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "proba"} for r in rows]
    assert strip(made["logreg"].predict_images(str(path))) == strip(made["logreg"].predict_images([path]))
    assert len(made["logreg"].predict_images(str(data / "test"))) == len(list((data / "test").rglob("*.jpg")))


def test_predict_images_takes_bytes_and_refuses_no_paths_in_one_line(runs, tmp_path):
    data, made = runs
    path = sorted((data / "test").rglob("*.jpg"))[0]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "proba"} for r in rows]
    assert strip(made["logreg"].predict_images(os.fsencode(path))) == strip(made["logreg"].predict_images([path]))
    with pytest.raises(UserError, match="^no image paths given"):
        made["logreg"].predict_images([])


def test_predict_gives_a_fifo_its_error_row_at_once(runs, tmp_path):
    data, made = runs
    os.mkfifo(tmp_path / "pipe.jpg")
    rows = made["logreg"].predict_images([tmp_path / "pipe.jpg", sorted((data / "test").rglob("*.jpg"))[0]])
    assert [r["error"] for r in rows] == ["not a regular file (a FIFO)", ""]


def test_the_public_names_stay_functions_whatever_is_imported():
    """No submodule shadows a name of `pipeline` (importing `pipeline.extract` once rebound it to a module)."""
    code = ("import importlib, inspect, pkgutil, pipeline\n"
            "names = {n: getattr(pipeline, n) for n in pipeline.__all__}\n"
            "for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'):\n"
            "    if m.name != 'pipeline.__main__':\n"
            "        importlib.import_module(m.name)\n"
            "from pipeline import extract\n"
            "bad = [n for n in pipeline.__all__ if inspect.ismodule(getattr(pipeline, n)) or getattr(pipeline, n) is not names[n]]\n"
            "print(bad, inspect.isfunction(extract))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[] True", done.stderr[-2000:]


SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "score_with_onnxruntime.py"


def test_the_docs_onnxruntime_example_scores_a_folder_as_predict_does(runs, tmp_path):
    """docs/score_with_onnxruntime.py (shown in docs/production.md) needs onnxruntime, Pillow and numpy only."""
    data, made = runs
    run = made["logreg"]
    page = (SCRIPT.parent / "production.md").read_text()
    assert SCRIPT.read_text().split('"""\n', 1)[1] in page  # the docs show the file as it is
    out = tmp_path / "m.onnx"
    assert CliRunner().invoke(app, ["export", str(run.folder), "--out", str(out)]).exit_code == 0
    done = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path = [p for p in sys.path if 'pipeline' not in p]; "
                           f"import runpy; sys.argv = ['s', {str(out)!r}, {str(data / 'test')!r}]; "
                           f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              p for p in sys.path if p.endswith("site-packages"))))
    assert done.returncode == 0, done.stderr
    lines = [line.split(",") for line in done.stdout.strip().splitlines()]
    expected = {row["path"]: row for row in run.predict_images(sorted((data / "test").rglob("*.jpg")))}
    assert len(lines) == len(expected) == 9
    for path, predicted, probability in lines:
        assert predicted == expected[path]["predicted"] and abs(float(probability) - float(expected[path]["probability"])) < 1e-3


def _images_of_every_mode(folder: Path) -> list[Path]:
    """One image per mode the project reads, with content that clipping or a wrong conversion would change."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 65535, 40 * 56).reshape(40, 56)
    made = {"sixteen.png": Image.fromarray(ramp.astype(np.uint16)),  # I;16: Pillow's convert("RGB") clips at 255
            "int32.tif": Image.fromarray((ramp * 3).astype(np.int32)),  # I: over 65535 too
            "float.tif": Image.fromarray((ramp / 9e3 - 2).astype(np.float32)),  # F: negative and above 1
            "gray.jpg": Image.fromarray(rng.integers(0, 255, (40, 56), dtype=np.uint8)),
            "rgba.png": Image.fromarray(rng.integers(0, 255, (40, 56, 4), dtype=np.uint8), "RGBA"),
            "cmyk.jpg": Image.fromarray(rng.integers(0, 255, (40, 56, 4), dtype=np.uint8), "CMYK"),
            "bits.bmp": Image.fromarray(rng.integers(0, 2, (40, 56), dtype=np.uint8) * 255).convert("1")}
    palette = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 3
    made["palette.png"] = palette
    paths = []
    for name, image in made.items():
        image.save(folder / name, **({"transparency": 3} if name == "palette.png" else {}))
        paths.append(folder / name)
    turned = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    exif = turned.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: both must turn it upright
    turned.save(folder / "turned.jpg", exif=exif)
    return [*paths, folder / "turned.jpg"]


def test_the_docs_snippet_preprocesses_every_image_mode_as_the_package_does(runs, tmp_path):
    """16-bit and float images are rescaled by both (Pillow alone clips them: up to 99 levels apart before)."""
    import runpy

    snippet = runpy.run_path(str(SCRIPT), run_name="snippet")
    data, made = runs
    fcfg = made["logreg"].feature_config
    for path in _images_of_every_mode(tmp_path):
        ours = api.preprocess(path, made["logreg"]).numpy()
        theirs = snippet["preprocess"](path, fcfg.resize_size, fcfg.image_size)
        assert theirs.shape == ours.shape and np.array_equal(theirs, ours), path.name
