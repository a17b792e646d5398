"""`serve --features CACHE`: GET/POST /similar answer as `similar` does; without --features a 404 that says so; k
bounded, bad images and large bodies refused; a cache of other features refused at start."""

import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import extract_config
from PIL import Image

from pipeline.extraction.runner import extract
from pipeline.heads.config import HeadConfig
from pipeline.hub.config import SimilarConfig
from pipeline.hub.similar import similar
from pipeline.synthetic import make_image_folder
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head

QUERY = "train/circle/00000.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log_path):
    port = _free_port()
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", *args, "--port", str(port),
                                 "--max-request-mb", "1", "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
    proc.kill()
    pytest.fail("the server did not start")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run and its cache, served twice: with --features and without."""
    root = tmp_path_factory.mktemp("similar-serve")
    data = make_image_folder(root / "data", {"train": 4, "val": 2}, size=(40, 36))
    cache = extract(extract_config(data, root / "f.h5")).out
    run = train_head(TrainConfig(features=cache, out=root / "run", head=HeadConfig(kind="knn", k=3))).folder
    with_features = _start([str(run), "--features", str(cache)], root / "a.log")
    without = _start([str(run)], root / "b.log")
    yield data, cache, with_features[1], without[1]
    for proc, _ in (with_features, without):
        proc.terminate()
        proc.wait(timeout=30)


def _call(url: str, path: str, method: str = "GET", files=None, body: bytes | None = None):
    headers = {}
    if files is not None:
        boundary = "b0undary"
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                        for name, data in files) + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    request = urllib.request.Request(url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_get_similar_answers_as_the_command_does(served):
    _, cache, url, _ = served
    status, body = _call(url, f"/similar?path={urllib.parse.quote(QUERY)}&k=4")
    got = json.loads(body)
    (want,) = similar(SimilarConfig(cache, (QUERY,), k=4)).results
    assert status == 200 and got["query"] == QUERY
    assert [n["path"] for n in got["neighbours"]] == [n.path for n in want.neighbours]
    assert got["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert set(got["neighbours"][0]) == {"path", "split", "class", "similarity"}
    assert _call(url, f"/similar?path={urllib.parse.quote(QUERY)}", method="HEAD")[0] == 200


def test_post_similar_finds_the_uploaded_image_first(served):
    data, _, url, _ = served
    status, body = _call(url, "/similar?k=3", "POST", files=[("x.jpg", (data / QUERY).read_bytes())])
    got = json.loads(body)
    assert status == 200 and got["query"] == "x.jpg" and got["neighbours"][0]["path"] == QUERY
    assert got["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_without_features_similar_is_a_404_that_says_how(served):
    *_, url = served
    status, body = _call(url, f"/similar?path={QUERY}")
    assert status == 404 and "--features" in json.loads(body)["error"]


@pytest.mark.parametrize("path, status", [(f"/similar?path={QUERY}&k=101", 422), (f"/similar?path={QUERY}&k=0", 422),
                                          (f"/similar?path={QUERY}&k=-1", 422), (f"/similar?path={QUERY}&k=1e9", 422),
                                          ("/similar", 422), ("/similar?path=train/nope.jpg", 404)],
                         ids=["k-101", "k-0", "k-negative", "k-not-a-whole-number", "no-path", "unknown-path"])
def test_bad_get_requests_are_4xx_json(served, path, status):
    _, _, url, _ = served
    got_status, body = _call(url, path)
    assert got_status == status and "error" in json.loads(body)


def test_a_post_that_is_not_one_image_is_refused(served):
    data, _, url, _ = served
    status, body = _call(url, "/similar", "POST", files=[("notes.jpg", b"%!PS-Adobe-3.0 not an image")])
    assert status == 422 and "notes.jpg" in json.loads(body)["error"]
    image = (data / QUERY).read_bytes()
    status, body = _call(url, "/similar", "POST", files=[("a.jpg", image), ("b.jpg", image)])
    assert status == 422 and "one image" in json.loads(body)["error"]
    assert _call(url, "/similar", "POST", body=b"")[0] == 422


def test_a_body_over_the_limit_is_a_413(served):
    _, _, url, _ = served
    big = io.BytesIO()
    Image.frombytes("RGB", (1200, 1000), bytes(range(256)) * 14063).save(big, "PNG")  # incompressible: over 1 MB
    status, body = _call(url, "/similar", "POST", files=[("big.png", big.getvalue() + b"\0" * (1 << 20))])
    assert status == 413 and "max-request-mb" in json.loads(body)["error"]


def test_a_cache_of_other_features_is_refused_at_start(served, tmp_path):
    data, cache, _, _ = served
    other = extract(extract_config(data, tmp_path / "g.h5", image_size=64)).out
    run = next(p for p in cache.parent.glob("run*") if (p / "run.json").is_file())
    result = subprocess.run([sys.executable, "-m", "pipeline", "serve", str(run), "--features", str(other),
                             "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "give the run's own cache" in result.stderr
