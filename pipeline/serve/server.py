"""`pipeline serve`: a run behind HTTP (FastAPI on uvicorn), loaded once.

    POST /predict   one or more image files (multipart, any field name; at most MAX_FILES) -> one result per file,
                    in order: {"file", "predicted", "probability", "top_k": [{"class", "probability"}],
                    "distance_percentile", "unusual"}, the values `predict` gives (the same decoding,
                    preprocessing, extractor, rounding, head and reference)
    GET  /health    {"status": "ok"}   (HEAD too, as load balancers probe)
    GET  /info      run name, classes, fingerprint, crop size, head, library versions   (HEAD too)
    GET  /similar?path=P&k=K   with --features CACHE (the run's cache): the k nearest cached images to the cached
                    image P (HEAD too); POST /similar?k=K: to one uploaded image (multipart), embedded as /predict
                    embeds: {"query", "neighbours": [{"path", "split", "class", "similarity"}]} (hub/similar.py's
                    answer; k at most MAX_K). Without --features: 404, saying so.

Bad input is a 4xx JSON error ({"error": ...}), never a 500: a file that is not an allowed raster image (images.py:
a PostScript program is refused unread), truncated, empty, over Pillow's decompression-bomb limit or of an extreme
shape (422, naming the file), a request over --max-request-mb (413, before it is kept whole) or with more than
MAX_FILES files (413), no file (422), an unknown route (404) or method (405). A client that goes away mid-upload is
one log line.

One thread runs the model, a forward of at most `batch` images at a time (MAX_BATCH on a GPU, CPU_BATCH on a CPU,
where a forward of 64 takes seconds): a request's images are embedded in such chunks, and every request waiting
gets its share of each forward (`Batcher`), so a request of hundreds of images delays another client's single image
by about one forward, not by all of them. Requests that arrive while the model runs join its next forward (no
waiting added: alone, a request runs at once). At most DECODE_SLOTS images are decoded at once, all requests
together, which bounds the memory decoding takes (each image at most Pillow's 89.5 Mpx while it is decoded). It
binds 127.0.0.1 by default and has no authentication and no TLS: put it behind your proxy for anything else.
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

# images per forward (1: no batching across requests; bench/serve_load.py compares the two): on a GPU a batch costs
# about what one image does; on a CPU a forward takes ~0.1 s an image, so forwards stay short and a large request is
# interleaved with the others at a fine grain
MAX_BATCH = int(os.environ.get("VGGCACHE_SERVE_MAX_BATCH", "64"))
CPU_BATCH = min(MAX_BATCH, 8)
MAX_K = 100  # neighbours one /similar request may ask for
MAX_FILES = 4 * 64  # images in one request: a small multiple of a GPU forward
# images decoded at once, all requests together: an image at Pillow's limit (89.5 Mpx) takes up to ~0.7 GB while
# it is decoded (a 16-bit PNG, measured), so this bounds the server's decoding memory whatever the clients send
DECODE_SLOTS = max(1, min(4, os.cpu_count() or 1))
# connections (and requests) at once, a worker process: uvicorn answers 503 above. With --max-request-mb it bounds
# what uploads held in memory take (64 x 32 MB by default): 100 clients of 28 MB each took 2.65 GB without it
MAX_CONNECTIONS = 64
CONFIG_ENV = "VGGCACHE_SERVE"  # the server's config, as JSON, for uvicorn's worker processes (--workers N)


class BadImage(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


class _Job:
    """A request's decoded images, embedded a share at a time."""

    def __init__(self, images: list, loop, future, rows_only: bool = False):
        self.images, self.loop, self.future, self.rows_only = images, loop, future, rows_only
        self.done, self.parts = 0, []  # images embedded so far; their (proba, far, rows) blocks (Predictor.far)

    def result(self):
        """What the request waits for: its feature rows (rows_only: /similar), else (proba, far)."""
        if self.rows_only:
            return np.concatenate([rows for _, _, rows in self.parts])
        proba = np.concatenate([p for p, _, _ in self.parts])
        far = None if self.parts[0][1] is None else tuple(np.concatenate([f[i] for _, f, _ in self.parts]) for i in (0, 1))
        return proba, far

    @property
    def left(self) -> int:
        return len(self.images) - self.done


class Batcher:
    """One thread runs the model; requests queue their decoded images. Each forward takes at most `batch` images:
    an equal share from every request waiting (the share: batch / requests, at least one), then, while there is
    room, more from the oldest. So a large request runs as a series of forwards, and a request arriving meanwhile
    is in the next one; under load batches fill from many requests, and a lone request waits for nothing."""

    def __init__(self, predictor, batch: int):
        self.predictor, self.batch, self.jobs = predictor, max(1, batch), queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="vggcache-batcher").start()

    async def embed(self, images: list, rows_only: bool = False):
        """(probabilities, (distance percentiles, unusual flags) or None) of `images`, in order; `rows_only`: their
        feature rows (the head's inputs) instead."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put(_Job(images, loop, future, rows_only))
        return await future

    def _run(self) -> None:
        pending: list[_Job] = []
        while True:
            if not pending:
                pending.append(self.jobs.get())
            while not self.jobs.empty():
                pending.append(self.jobs.get_nowait())
            taken = self.shares([job.left for job in pending])
            try:
                self._forward([(job, n) for job, n in zip(pending, taken) if n])
            except Exception as e:  # never a dead batcher: the requests of this forward get the error
                for job, n in zip(pending, taken):
                    if n:
                        job.done = len(job.images)
                        job.loop.call_soon_threadsafe(_settle, job.future, e)
                        job.parts = None
            for job in pending:
                if job.left == 0 and job.parts is not None:
                    job.loop.call_soon_threadsafe(_settle, job.future, job.result())
            pending = [job for job in pending if job.left]

    def shares(self, left: list[int]) -> list[int]:
        """Images each waiting request gives the next forward, from what each has left."""
        share = max(1, self.batch // len(left))
        taken = [min(n, share) for n in left]
        room = self.batch - sum(taken)
        for k, n in enumerate(left):  # the room left, to the oldest first
            more = min(room, n - taken[k])
            taken[k] += max(0, more)
            room -= max(0, more)
        return taken

    def _forward(self, chunks: list) -> None:
        import torch

        images = torch.stack([image for job, n in chunks for image in job.images[job.done:job.done + n]])
        rows = self.predictor.features(images)
        proba, far = self.predictor.proba(rows), self.predictor.far(rows)
        start = 0
        for job, n in chunks:
            job.parts.append((proba[start:start + n], None if far is None else tuple(f[start:start + n] for f in far),
                              rows[start:start + n]))
            job.done += n
            start += n


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


class Decoder:
    """Decodes uploads in worker threads, at most `slots` at a time across every request (each thread holds one
    image, up to Pillow's pixel limit, while it decodes it)."""

    def __init__(self, fcfg, slots: int):
        self.fcfg, self.slots = fcfg, asyncio.Semaphore(slots)

    async def __call__(self, name: str, data: bytes):
        async with self.slots:
            return await asyncio.to_thread(decode, name, data, self.fcfg)


def make_app(cfg: ServeConfig):
    """The FastAPI application of one run (loaded here, once)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    from pipeline.serve.predict import Predictor
    from pipeline.versions import library_versions

    predictor = Predictor(Path(cfg.run), cfg.weights, cfg.device, "auto")
    run = predictor.run
    batcher = Batcher(predictor, MAX_BATCH if predictor.extractor.device.type == "cuda" else CPU_BATCH)
    app = FastAPI(title=f"vggcache: {run.record.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_LimitedBody, limit=int(cfg.max_request_mb * (1 << 20)))
    error = lambda status, message, **more: JSONResponse({"error": message, **more}, status_code=status)
    decoded = Decoder(predictor.fcfg, DECODE_SLOTS)
    similar = SimilarRows(cfg.features, predictor) if cfg.features else None

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return error(422, "send one or more image files as multipart/form-data")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    @app.api_route("/info", methods=["GET", "HEAD"])
    async def info():
        return {"run": run.record.name, "classes": run.class_names, "fingerprint": run.fingerprint,
                "crop_size": predictor.fcfg.image_size, "head": run.record.head.kind, "chosen": run.record.head.chosen,
                "device": str(predictor.extractor.device), "versions": library_versions()}

    @app.post("/predict")
    async def predict(request: Request):
        try:
            uploads = await _uploads(request)
        except TooManyFiles:
            return error(413, f"more than {MAX_FILES} files in one request: send them in several")
        except ClientDisconnect:  # nobody to answer: one line, not the framework's traceback
            log.warning("a client (%s) went away during its upload", _client(request))
            return Response(status_code=400)
        if not uploads:
            return error(422, "no file: send one or more image files as multipart/form-data")
        try:
            images = [await decoded(name, data) for name, data in uploads]
        except BadImage as e:
            return error(422, f"{e.file} is not an image this server can read ({e.reason})", file=e.file)
        proba, far = await batcher.embed(images)
        return {"results": [_result(name, p, run.class_names, cfg.top_k,
                                    None if far is None else (far[0][i], far[1][i]))
                            for i, ((name, _), p) in enumerate(zip(uploads, proba))]}

    @app.api_route("/similar", methods=["GET", "HEAD", "POST"])
    async def similar_images(request: Request):
        if similar is None:
            return error(404, "this server answers /similar only when started with --features CACHE (the run's cache)")
        k = _k(request.query_params.get("k", "10"))
        if k is None:
            return error(422, f"k must be a whole number from 1 to {MAX_K}")
        if request.method in ("GET", "HEAD"):
            path = request.query_params.get("path")
            if path is None:
                return error(422, "GET /similar?path=P: the path of an image in the cache (or POST one image)")
            row = similar.searcher.row_of.get(path)
            if row is None:
                return error(404, f"{path[:300]!r} is not a path in the cache", path=path[:300])
            return {"query": path, "neighbours": similar.answer(similar.searcher.of_row(row, k))}
        try:
            uploads = await _uploads(request)
        except TooManyFiles:
            return error(413, f"more than {MAX_FILES} files in one request: POST /similar takes one image")
        except ClientDisconnect:
            log.warning("a client (%s) went away during its upload", _client(request))
            return Response(status_code=400)
        if len(uploads) != 1:
            return error(422, f"POST /similar takes one image file as multipart/form-data ({len(uploads)} sent)")
        name, data = uploads[0]
        try:
            image = await decoded(name, data)
        except BadImage as e:
            return error(422, f"{e.file} is not an image this server can read ({e.reason})", file=e.file)
        rows = await batcher.embed([image], rows_only=True)
        found = await asyncio.to_thread(similar.searcher.of_raw, similar.pooled(rows)[0], k)
        return {"query": name, "neighbours": similar.answer(found)}

    return app


def _k(text: str) -> int | None:
    """k of a /similar request, or None when it is not a whole number from 1 to MAX_K."""
    return int(text) if text.isdigit() and len(text) <= 4 and 1 <= int(text) <= MAX_K else None


class SimilarRows:
    """The run's cache searched by /similar: refused at start, in one line, unless it holds the run's features;
    its index (hub/index.py) loaded or built once, searched with one faiss thread (the model has the cores)."""

    def __init__(self, features: str, predictor):
        from pipeline.cache.store import open_cache
        from pipeline.hub.index import Selection
        from pipeline.hub.similar import Searcher

        run = predictor.run
        with open_cache(Path(features)) as cache:
            if cache.header.fingerprint != run.fingerprint:
                raise UserError(f"--features {features} holds features {cache.header.fingerprint}, but the run "
                                f"{run.record.name} was trained on {run.fingerprint}: give the run's own cache")
            fcfg = cache.header.feature_config(cache.path)
            pool = run.record.pool or ("avg" if fcfg.is_map else None)
            # a run that takes a map as it is (block5) has raw maps for rows: average-pooled here, as the index's
            self.extra = fcfg.head_pooling("avg") if fcfg.is_map and run.record.pool is None else None
            self.searcher = Searcher(cache, Selection(pool, ()), threads=1)
        log.info("/similar searches %s: %s", features, self.searcher.index.describe())

    def pooled(self, rows: np.ndarray) -> np.ndarray:
        return self.extra(rows) if self.extra else rows

    @staticmethod
    def answer(neighbours) -> list[dict]:
        from pipeline.text import printable  # a name's bytes that are not UTF-8 as \xNN: JSON must be valid UTF-8

        return [{"path": printable(n.path), "split": printable(n.split), "class": printable(n.label),
                 "similarity": round(n.similarity, 6)}
                for n in neighbours]


class TooManyFiles(Exception):
    pass


async def _uploads(request) -> list[tuple[str, bytes]]:
    """Every file part of a multipart request, (file name, bytes), in order; [] for any other body. Starlette keeps
    a part of up to 1 MB in memory and spools a larger one to an unnamed temporary file, gone with the request."""
    from starlette.exceptions import HTTPException

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return []
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except HTTPException as e:
        if "Too many files" in str(e.detail):
            raise TooManyFiles from None
        raise
    out = []
    for _, value in form.multi_items():
        if hasattr(value, "read"):
            out.append((value.filename or "upload", await value.read()))
    return out


def _client(request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown"


def _result(name: str, proba: np.ndarray, names: list[str], k: int, far: tuple | None) -> dict:
    order = np.argsort(-proba, kind="stable")[:k]
    return {"file": name, "predicted": names[order[0]], "probability": float(proba[order[0]]),
            "top_k": [{"class": names[j], "probability": float(proba[j])} for j in order],
            "distance_percentile": None if far is None else round(float(far[0]), 1),
            "unusual": None if far is None else bool(far[1])}


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
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", limit_concurrency=MAX_CONNECTIONS)
        return
    os.environ[CONFIG_ENV] = json.dumps(asdict(cfg))
    uvicorn.run("pipeline.serve.server:app_from_environment", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, log_level="warning", limit_concurrency=MAX_CONNECTIONS)
