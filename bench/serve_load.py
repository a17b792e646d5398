"""`make bench` row 15: a load test of `pipeline serve` on 127.0.0.1 (never another address), bounded in requests and
time: N concurrent clients send a fixed number of requests of one JPEG each; requests/s, p50/p99 latency, errors
(must be 0), and the server's RSS before and after (growth must stay under 10%), with the batcher on (requests that
arrive while the model runs share its next forward) and off (one forward per request), in the same run.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb(pid: int) -> float:
    return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")) / 1024


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(tmp: Path, image_size: int) -> Path:
    """A logreg run on 60 generated images, random weights (`--weights none`) at the bench's image size."""
    from pipeline import api
    from pipeline.synthetic import make_image_folder

    data = make_image_folder(tmp / "data", {"train": 12, "val": 8}, size=(500, 375))
    api.extract(data, out=tmp / "f.h5", weights="none", image_size=image_size)
    return api.train_head(tmp / "f.h5", out=tmp / "run", C=1.0).folder


def _jpeg(size=(500, 375)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _request(url: str, body: bytes, content_type: str) -> float:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=120) as response:
        json.loads(response.read())
    return time.perf_counter() - start


def load(run: Path, clients: int = 8, requests: int = 160, max_batch: int = 64, seconds_cap: float = 120) -> dict:
    """Start the server, send `requests` one-image requests from `clients` threads, stop it."""
    port = _port()
    env = dict(os.environ, VGGCACHE_SERVE_MAX_BATCH=str(max_batch))
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", str(run), "--port", str(port)], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base, server)
        boundary = "bench"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n".encode()
                + _jpeg() + f"\r\n--{boundary}--\r\n".encode())
        kind = f"multipart/form-data; boundary={boundary}"
        for _ in range(3):  # warm-up: the first forwards build oneDNN's kernels
            _request(f"{base}/predict", body, kind)
        rss_before = _rss_mb(server.pid)
        latencies, errors, left = [], [], [requests]
        lock, deadline = threading.Lock(), time.time() + seconds_cap

        def client():
            while time.time() < deadline:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                try:
                    latencies.append(_request(f"{base}/predict", body, kind))
                except (urllib.error.URLError, OSError) as e:
                    errors.append(str(e))

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        rss_after = _rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": seconds,
            "requests_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None, "rss_before_mb": rss_before,
            "rss_after_mb": rss_after, "max_batch": max_batch}


def _wait(base: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server stopped: {server.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not answer /health")


def bench_serve(tmp: Path, image_size: int = 224, clients: int = 8, requests: int = 160) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    run = tiny_run(tmp, image_size)
    out = {"image_size": image_size}
    for name, max_batch in (("batched", 64), ("one_by_one", 1)):
        out[name] = load(run, clients, requests, max_batch)
        r = out[name]
        print(f"  serve, {name}: {r['requests_per_s']:.1f} requests/s, p50 {r['p50_ms']:.0f} ms, p99 "
              f"{r['p99_ms']:.0f} ms, {r['errors']} errors, RSS {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} MB",
              flush=True)
    return out


def markdown_rows(r: dict) -> list[str]:
    return [f"| 15 | `serve`, {v['clients']} clients x one {r['image_size']} px JPEG a request, {label} | "
            f"{v['requests_per_s']:.1f} requests/s, p50 {v['p50_ms']:.0f} ms, p99 {v['p99_ms']:.0f} ms, "
            f"{v['errors']} errors of {v['requests']}, RSS {v['rss_before_mb']:.0f} -> {v['rss_after_mb']:.0f} MB |"
            for key, label in (("batched", "batched"), ("one_by_one", "one forward per request"))
            for v in [r[key]]]


def targets(r: dict) -> list[tuple[str, str, str, bool | None]]:
    b, one = r["batched"], r["one_by_one"]
    growth = (b["rss_after_mb"] - b["rss_before_mb"]) / b["rss_before_mb"]
    return [("serve: errors under load", f"{b['errors'] + one['errors']}", "0", b["errors"] + one["errors"] == 0),
            ("serve: server RSS growth under load", f"{growth:+.1%}", "<= 10%", growth <= 0.10),
            ("serve: batched / one forward per request (requests/s)", f"{b['requests_per_s'] / one['requests_per_s']:.2f}x",
             "reported", None)]


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="row 15 alone: the server's load test")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=160)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_serve(Path(tmp), a.image_size, a.clients, a.requests)
    print("\n".join(markdown_rows(result)))
    for row in targets(result):
        print(row)
