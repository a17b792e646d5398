"""`pipeline serve`: a run behind HTTP (FastAPI on uvicorn), loaded once.

    POST /predict   one or more image files (multipart, any field name) -> one result per file, in order:
                    {"file", "predicted", "probability", "top_k": [{"class", "probability"}]}, the values `predict`
                    gives (the same decoding, preprocessing, extractor, rounding and head)
    GET  /health    {"status": "ok"}
    GET  /info      run name, classes, fingerprint, crop size, head, library versions

Bad input is a 4xx JSON error ({"error": ...}), never a 500: a file that is not an image, truncated, empty or over
Pillow's decompression-bomb limit (422, naming the file), a request over --max-request-mb (413, before it is kept
whole), no file (422), an unknown route (404) or method (405). Requests that arrive while the model runs are batched
into its next forward (no waiting added: alone, a request runs at once). It binds 127.0.0.1 by default and has no
authentication and no TLS: put it behind your proxy for anything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np

try:  # at module level: FastAPI resolves the endpoints' annotations here
    from starlette.requests import Request
except ImportError:  # the serve extra is missing: serve() says so in one line
    Request = None

from pipeline.errors import UserError
from pipeline.serve.config import ServeConfig

log = logging.getLogger(__name__)

# images per forward of the batcher (1: no batching across requests; bench/serve_load.py compares the two)
MAX_BATCH = int(os.environ.get("VGGCACHE_SERVE_MAX_BATCH", "64"))
CONFIG_ENV = "VGGCACHE_SERVE"  # the server's config, as JSON, for uvicorn's worker processes (--workers N)


class BadImage(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


class Batcher:
    """One thread runs the model; requests queue their decoded images, and each forward takes every image queued
    meanwhile (up to MAX_BATCH): batches form under load, and a lone request waits for nothing."""

    def __init__(self, predictor):
        self.predictor, self.jobs = predictor, queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="vggcache-batcher").start()

    async def proba(self, images: list) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((images, loop, future))
        return await future

    def _run(self) -> None:
        import torch

        while True:
            jobs = [self.jobs.get()]
            while not self.jobs.empty() and sum(len(j[0]) for j in jobs) < MAX_BATCH:
                jobs.append(self.jobs.get_nowait())
            try:
                images = torch.stack([image for job in jobs for image in job[0]])
                proba = self.predictor.proba(self.predictor.features(images))
                results, start = [], 0
                for job in jobs:
                    results.append(proba[start:start + len(job[0])])
                    start += len(job[0])
            except Exception as e:  # never a dead batcher: every waiting request gets the error
                results = [e] * len(jobs)
            for (_, loop, future), result in zip(jobs, results):
                loop.call_soon_threadsafe(_settle, future, result)


def _settle(future, result) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def decode(name: str, data: bytes, fcfg):
    """An uploaded file -> the model's input image, as extract decodes and preprocesses a file."""
    from pipeline.extraction.reader import preprocess
    from pipeline.images import open_image, why_not_read

    try:
        return preprocess(open_image(data, fcfg.resize_size), fcfg.resize_size, fcfg.image_size)
    except Exception as e:
        raise BadImage(name, why_not_read(e, len(data))) from None


def make_app(cfg: ServeConfig):
    """The FastAPI application of one run (loaded here, once)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from pipeline.serve.predict import Predictor
    from pipeline.versions import library_versions

    predictor = Predictor(Path(cfg.run), cfg.weights, cfg.device, "auto")
    batcher, run = Batcher(predictor), predictor.run
    app = FastAPI(title=f"vggcache: {run.record.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_LimitedBody, limit=int(cfg.max_request_mb * (1 << 20)))
    error = lambda status, message, **more: JSONResponse({"error": message, **more}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error(422, "send one or more image files as multipart/form-data")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {"run": run.record.name, "classes": run.class_names, "fingerprint": run.fingerprint,
                "crop_size": predictor.fcfg.image_size, "head": run.record.head.kind, "chosen": run.record.head.chosen,
                "device": str(predictor.extractor.device), "versions": library_versions()}

    @app.post("/predict")
    async def predict(request: Request):
        uploads = await _uploads(request)
        if not uploads:
            return error(422, "no file: send one or more image files as multipart/form-data")
        try:
            images = [await asyncio.to_thread(decode, name, data, predictor.fcfg) for name, data in uploads]
        except BadImage as e:
            return error(422, f"{e.file} is not an image this server can read ({e.reason})", file=e.file)
        proba = await batcher.proba(images)
        return {"results": [_result(name, p, run.class_names, cfg.top_k) for (name, _), p in zip(uploads, proba)]}

    return app


async def _uploads(request) -> list[tuple[str, bytes]]:
    """Every file part of a multipart request, (file name, bytes), in order; [] for any other body."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return []
    form = await request.form(max_files=4096, max_fields=4096)
    out = []
    for _, value in form.multi_items():
        if hasattr(value, "read"):
            out.append((value.filename or "upload", await value.read()))
    return out


def _result(name: str, proba: np.ndarray, names: list[str], k: int) -> dict:
    order = np.argsort(-proba, kind="stable")[:k]
    return {"file": name, "predicted": names[order[0]], "probability": float(proba[order[0]]),
            "top_k": [{"class": names[j], "probability": float(proba[j])} for j in order]}


class _LimitedBody:
    """ASGI middleware: a request whose body is over `limit` bytes is answered 413 (by its Content-Length before
    anything is kept, else as soon as the bytes read pass the limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if headers.get(b"expect", b"").lower() != b"100-continue":  # else the client waits and sends nothing
                await _discard_body(receive, DISCARD_FACTOR * self.limit)
            return await _too_large(send, self.limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _discard_body(receive, DISCARD_FACTOR * self.limit)
            await _too_large(send, self.limit)


class _TooLarge(Exception):
    pass


# A refused body is read and dropped (up to this many times the limit) before the 413 is sent: a client still
# sending when the server answers and closes gets a broken pipe or a reset instead of the answer. nginx's lingering
# close does the same; nothing of it is kept.
DISCARD_FACTOR = 8


async def _discard_body(receive, most: int) -> None:
    read = 0
    while read <= most:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        read += len(message.get("body", b""))


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"error": f"request larger than --max-request-mb ({limit / (1 << 20):g} MB)"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def app_from_environment():
    """uvicorn's factory for --workers N: each worker process builds the app from CONFIG_ENV."""
    return make_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))


def serve(cfg: ServeConfig) -> None:
    """Load the run (refused in one line before binding if it cannot serve), then serve until stopped."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("pipeline serve needs FastAPI and uvicorn: pip install -e '.[serve]' (make install does)") from None

    app = make_app(cfg)  # a run that cannot load is one line here, not a worker's traceback
    log.info("serving %s on http://%s:%d (no authentication, no TLS: put it behind your proxy beyond localhost)",
             cfg.run, cfg.host, cfg.port)
    if cfg.workers == 1:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
        return
    os.environ[CONFIG_ENV] = json.dumps(asdict(cfg))
    uvicorn.run("pipeline.serve.server:app_from_environment", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, log_level="warning")
