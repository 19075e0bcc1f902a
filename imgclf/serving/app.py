"""HTTP serving: a FastAPI app with dynamic batching, a web page and Prometheus metrics.

Request path: the framework reads the whole upload (within ``request_timeout_s``, so a slow
client only holds its own connection, and not for ever), images are decoded in a bounded thread
pool (one request may use at most half of it, and all its images together are bounded by
``max_request_pixels``), then the :class:`~imgclf.serving.batcher.Batcher` gathers up to
``max_batch`` images, waiting at most ``max_wait_ms`` for more, and runs
:meth:`Bundle.predict_batch` in a single inference thread. Each request awaits the futures of
its own images, so results come back in request order.

Fairness: one client address may have at most ``max_client_requests`` predict/explain requests
in flight (429 beyond); a request holding more pixels than one maximum-size image decodes on
lower-priority threads; small requests are batched first and a bulk one's images run at most
``bulk_batch`` at a time (see :class:`~imgclf.serving.batcher.Batcher`); Grad-CAM runs on its
own lower-priority thread with its own model (never on the inference thread), one at a time.

The routes are module-level handlers that read the server's :class:`ServeState` from
``request.app.state.serve``; :func:`create_app` only builds that state and wires the router,
middleware and error handlers. Bad input never gives a 500: oversized bodies get 413,
undecodable data 400/415, slow bodies 408, all with a JSON body ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from imgclf.core.errors import BundleError, ConfigError
from imgclf.core.imageio import ImageDecodeError, image_size
from imgclf.core.version import __version__
from imgclf.runtime.bundle import Bundle, load_bundle
from imgclf.serving.batcher import Batcher, QueueFull, ShuttingDown
from imgclf.serving.settings import DEFAULTS, SERVER_DEFAULTS, ServerSettings, ServeSettings, split_settings

ENV_CONFIG = "IMGCLF_SERVE_CONFIG"
# The /v1/explain overlay is drawn at most this big: a 9 MP overlay took about a second of CPU
# (bench/chaos.py --server), which on a small machine every other request feels.
EXPLAIN_MAX_SIDE = 1024
# Nice value (Linux, per thread) of the Grad-CAM and bulk-decode threads: 10 gives such a thread
# about a tenth of the CPU of a normal one when they compete, so small requests go first.
_BACKGROUND_NICE = 10
# Paths counted against max_client_requests (the ones that decode and compute).
_LIMITED_PATHS = {"/v1/predict", "/v1/explain"}

# ImageDecodeError.reason -> HTTP status. Anything not listed is a plain 400.
_STATUS_FOR_REASON = {
    "file too large": 413,
    "too many pixels": 413,
    "not an image": 415,
}
_PREDICT_EXAMPLE = {
    "predictions": [
        {
            "label": "3",
            "probability": 0.97,
            "top_k": [{"label": "3", "probability": 0.97}, {"label": "8", "probability": 0.02}],
            "unknown": False,
            "ood_score": 0.41,
            "filename": "hand.jpg",
        }
    ]
}
_KNOWN_PATHS = {"/", "/v1/predict", "/v1/explain", "/v1/model", "/healthz", "/metrics", "/docs"}
# A request whose images decode to more than this many bytes hands memory back afterwards.
_TRIM_AFTER_BYTES = 64 * 1024 * 1024


class ApiError(HTTPException):
    """An HTTP error rendered as ``{"error": short, "detail": longer}``."""

    def __init__(self, status: int, error: str, detail: str = "", **extra: Any) -> None:
        super().__init__(status_code=status, detail=detail)
        self.error = error
        self.extra = extra


class _Metrics:
    """Prometheus metrics in a registry of this app's own (several apps may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgclf_requests",
            "HTTP requests by path and status code",
            ["path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imgclf_request_latency_seconds",
            "Request latency (whole request, server side)",
            ["path"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imgclf_batch_size",
            "Images per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "imgclf_batch_inference_seconds",
            "Time of one Bundle.predict_batch call (one batch)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.images = Counter("imgclf_images", "Images classified", registry=self.registry)
        self.errors = Counter("imgclf_errors", "Error responses by kind", ["error"], registry=self.registry)
        self.queue_depth = Gauge(
            "imgclf_queue_depth", "Images waiting for the batcher", registry=self.registry
        )

    def on_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.batch_seconds.observe(seconds)
        self.images.inc(n)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _BodyTooLarge(ApiError):
    def __init__(self, limit: int, got: int | None = None) -> None:
        size = f"{got} bytes" if got is not None else "more"
        super().__init__(
            413,
            "upload too large",
            f"request body is {size}; the limit is {limit} bytes (server option --max-upload-mb)",
        )


class _LimitAndMeasure:
    """ASGI middleware: refuse bodies over the limit (by Content-Length up front, and while
    streaming for chunked uploads) and record request count and latency."""

    def __init__(self, app: Any, max_body: int, metrics: _Metrics, max_client_requests: int = 0) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics
        self.max_client = max_client_requests
        # In-flight predict/explain requests per client address. Only the event loop touches it.
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in _KNOWN_PATHS else ("/static" if path.startswith("/static/") else "other")
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            declared = None
            for k, v in scope.get("headers", []):
                if k == b"content-length":
                    try:
                        declared = int(v)
                    except ValueError:
                        declared = None
            if declared is not None and declared > self.max_body:
                err = _BodyTooLarge(self.max_body, declared)
                self.metrics.errors.labels(err.error).inc()
                # The body is never read; close the connection so the unread bytes are dropped.
                resp = _error_response(err, headers={"connection": "close"})
                await resp(scope, receive, send_wrapper)
                return
            client = (scope.get("client") or ("unknown", 0))[0]
            limited = self.max_client > 0 and path in _LIMITED_PATHS
            if limited and self.in_flight.get(client, 0) >= self.max_client:
                err = ApiError(
                    429,
                    "too many requests",
                    f"this client already has {self.max_client} requests in flight (server option "
                    "--max-client-requests); wait for their answers before sending more",
                )
                self.metrics.errors.labels(err.error).inc()
                resp = _error_response(err, headers={"connection": "close", "retry-after": "1"})
                await resp(scope, receive, send_wrapper)
                return
            seen = 0

            async def receive_limited() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(self.max_body)
                return message

            if limited:
                self.in_flight[client] = self.in_flight.get(client, 0) + 1
            try:
                await self.app(scope, receive_limited, send_wrapper)
            except ClientDisconnect:
                # The client left mid-request: nothing to answer, and not a server error.
                status["code"] = 499
                self.metrics.errors.labels("client disconnected").inc()
            finally:
                if limited:
                    left = self.in_flight[client] - 1
                    if left:
                        self.in_flight[client] = left
                    else:
                        del self.in_flight[client]  # the table holds active clients only
        finally:
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)


def _error_response(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": err.error, "detail": err.detail, **err.extra}
    return JSONResponse(body, status_code=err.status_code, headers=headers)


def _static_dir() -> Path:
    return Path(str(resources.files("imgclf") / "static"))


def _release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise; RSS would stay at its peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


async def _release_memory_off_loop() -> None:
    """:func:`_release_memory` on a worker thread: trimming a heap of hundreds of MB takes
    milliseconds, and on the event loop every other request would wait for it."""
    await asyncio.to_thread(_release_memory)


def _limit_malloc_arenas(n: int = 2) -> None:
    """Fewer glibc heaps for this process: decode threads each grow an arena of their own that is
    never handed back, so after one 200 MP request RSS stayed ~90 MB higher (bench/chaos.py)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _lower_priority() -> None:
    """Thread initializer: run this thread at a higher nice value (Linux sets it per thread)."""
    if sys.platform == "linux":  # elsewhere PRIO_PROCESS with a thread id would renice a process
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _BACKGROUND_NICE)
        except OSError:
            pass


def _explain_bundle(b: Bundle) -> Bundle:
    """The bundle Grad-CAM runs on: its hooks and backward pass must not meet a batch.

    With ONNX Runtime the PyTorch model is not used for predictions, so it is shared; with
    the torch backend Grad-CAM gets a deep copy of the network.
    """
    if b.model is None or b.backend == "onnxruntime":
        return b
    return dataclasses.replace(b, model=copy.deepcopy(b.model), _runner=None, _lock=threading.Lock())


@dataclass
class _Upload:
    name: str
    data: bytes


@dataclass
class ServeState:
    """Everything the handlers share, kept on ``app.state.serve``."""

    bundle: Bundle
    settings: ServeSettings
    batcher: Batcher
    metrics: _Metrics
    decode_slots: int
    explain_lock: asyncio.Lock | None = None
    explain_bundle: Bundle | None = None  # Grad-CAM's model (see _explain_bundle)
    _pools: dict[str, ThreadPoolExecutor] = field(default_factory=dict, repr=False)

    def _get_pool(self, name: str, workers: int, background: bool) -> ThreadPoolExecutor:
        # Made on first use and again after a shutdown, so the app object can be started twice.
        if name not in self._pools:
            self._pools[name] = ThreadPoolExecutor(
                max_workers=workers,
                thread_name_prefix=f"imgclf-{name}",
                initializer=_lower_priority if background else None,
            )
        return self._pools[name]

    def decode_pool(self, bulk: bool = False) -> ThreadPoolExecutor:
        """Threads decoding uploads; ``bulk``: the lower-priority ones for very large requests."""
        return self._get_pool("bulk-decode" if bulk else "decode", self.decode_slots, bulk)

    def explain_pool(self) -> ThreadPoolExecutor:
        """The one lower-priority thread Grad-CAM runs on (never the inference thread)."""
        return self._get_pool("explain", 1, True)

    def close_pool(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools.clear()


def _state(request: Request) -> ServeState:
    return request.app.state.serve


# --------------------------------------------------------------------------- request helpers


async def read_uploads(request: Request) -> tuple[list[_Upload], dict[str, str]]:
    """All uploaded files (any field name) or the raw body; plus plain form fields."""
    st = _state(request)
    ctype = request.headers.get("content-type", "")
    fields: dict[str, str] = {}
    uploads: list[_Upload] = []

    async def read() -> None:
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=st.settings.max_images + 1)
            for key, value in form.multi_items():
                if isinstance(value, StarletteUploadFile):
                    uploads.append(_Upload(value.filename or key, await value.read()))
                else:
                    fields[key] = str(value)
        else:
            body = await request.body()
            if body:
                uploads.append(_Upload("body", body))

    try:
        await asyncio.wait_for(read(), st.settings.request_timeout_s)
    except TimeoutError:
        raise ApiError(
            408,
            "request timeout",
            f"the request body took over {st.settings.request_timeout_s:g} s to arrive",
        ) from None
    if not uploads:
        raise ApiError(
            400,
            "no image",
            "send image files as multipart/form-data (any field name), or one image as the raw body",
        )
    if len(uploads) > st.settings.max_images:
        raise ApiError(
            413,
            "too many images",
            f"{len(uploads)} images in one request; the limit is {st.settings.max_images}",
        )
    return uploads, fields


def _check_request_pixels(st: ServeState, uploads: list[_Upload], per_image: int) -> int:
    """Refuse, from the headers alone, a request whose images would decode to too many pixels;
    returns the pixels the headers announce."""
    total = 0
    for i, up in enumerate(uploads):
        size = image_size(up.data)
        if size is None:
            continue  # not readable from the header: the decoder gives the precise error
        w, h = size
        if w * h > per_image:
            raise ApiError(
                413,
                "too many pixels",
                f"upload {up.name!r} (image {i + 1} of {len(uploads)}) is {w}x{h} = {w * h:,} pixels; "
                f"the limit is {per_image:,}",
                file=up.name,
                index=i,
            )
        total += w * h
    if total > st.settings.max_request_pixels:
        raise ApiError(
            413,
            "request too large",
            f"the {len(uploads)} images hold {total:,} pixels together; the limit per request is "
            f"{st.settings.max_request_pixels:,} (send fewer or smaller images per request)",
        )
    return total


async def decode_all(
    st: ServeState, uploads: list[_Upload], per_image: int | None = None, *, background: bool = False
) -> list[np.ndarray]:
    """Decode a request's images, at most ``decode_slots // 2`` at a time so others keep a share.

    A request holding more pixels than one maximum-size image (or ``background``: the explain
    upload) decodes on the lower-priority pool: it still gets the CPU that nobody else wants,
    but small requests go first.
    """
    per_image = per_image or st.settings.max_image_pixels
    total = _check_request_pixels(st, uploads, per_image)
    big = background or total > st.settings.max_image_pixels
    pool = st.decode_pool(bulk=big)
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max(1, st.decode_slots // 2))
    b, s = st.bundle, st.settings

    async def one(up: _Upload) -> np.ndarray:
        async with slots:
            return await loop.run_in_executor(
                pool,
                lambda: b.prepare(up.data, max_pixels=per_image, max_bytes=s.max_upload_bytes, name=up.name),
            )

    # The batcher waits (up to max_wait_ms) to fill a batch only for requests decoding now whose
    # images would join a small batch: waiting for a bulk request's images (seconds of decoding,
    # and batched apart anyway) only delayed every small request under a flood.
    quick = not big and len(uploads) <= st.batcher.share
    st.batcher.incoming += quick
    try:
        results = await asyncio.gather(*(one(up) for up in uploads), return_exceptions=True)
    finally:
        st.batcher.incoming -= quick
    for i, (up, r) in enumerate(zip(uploads, results)):
        if isinstance(r, ImageDecodeError):
            raise ApiError(
                _STATUS_FOR_REASON.get(r.reason, 400),
                r.reason,
                f"upload {up.name!r} (image {i + 1} of {len(uploads)}): {r.detail or r.reason}",
                file=up.name,
                index=i,
            )
        if isinstance(r, BaseException):
            raise r
    return list(results)  # type: ignore[arg-type]


def parse_top_k(query_value: int | None, fields: dict[str, str]) -> int:
    if query_value is not None:
        return query_value
    raw = fields.get("top_k")
    if raw is None:
        return 5
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(400, "invalid request", f"top_k must be an integer, got {raw!r}") from None
    if k < 1:
        raise ApiError(400, "invalid request", f"top_k must be >= 1, got {k}")
    return k


# --------------------------------------------------------------------------- routes

router = APIRouter()

_RAW_BODY_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "top_k": {"type": "integer"},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }
    }
}


@router.post(
    "/v1/predict",
    summary="Classify one or more images",
    description="Multipart files (any field name, results in upload order) or one raw image body.",
    openapi_extra=_RAW_BODY_DOC,
    responses={200: {"content": {"application/json": {"example": _PREDICT_EXAMPLE}}}},
)
async def predict(
    request: Request,
    top_k: int | None = Query(None, ge=1, description="classes per image (default 5)"),
) -> JSONResponse:
    st = _state(request)
    uploads, fields = await read_uploads(request)
    k = parse_top_k(top_k, fields)
    batcher = st.batcher
    images = await decode_all(st, uploads)
    try:
        rows = await batcher.submit(images)
    except QueueFull:
        raise ApiError(
            503,
            "server busy",
            f"{batcher.depth} images are already queued (limit {batcher.max_queue}); retry shortly",
        ) from None
    except ShuttingDown:
        raise ApiError(503, "shutting down", "the server is stopping; retry elsewhere") from None
    finally:
        st.metrics.queue_depth.set(batcher.depth)
    table = np.stack(rows)
    n = len(st.bundle.classes)
    # Rows are probabilities, then the unknown-image score when the bundle has one (see _scored).
    results = st.bundle.top_k(table[:, :n], k, table[:, n] if table.shape[1] > n else None)
    for up, r in zip(uploads, results):
        r["filename"] = up.name
    if sum(im.nbytes for im in images) + sum(len(u.data) for u in uploads) > _TRIM_AFTER_BYTES:
        del images, uploads
        await _release_memory_off_loop()
    # A plain JSONResponse skips FastAPI's per-field encoding: less work on the event loop.
    return JSONResponse({"predictions": results})


@router.post(
    "/v1/explain",
    summary="Grad-CAM overlay PNG for one image",
    description=(
        "The overlay of `class_name`, else of the predicted class; a multi-label model without "
        "`class_name` gets one overlay per predicted label, side by side, most probable first. "
        "The `X-Explained` header lists the labels drawn and their probabilities (JSON)."
    ),
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
    openapi_extra=_RAW_BODY_DOC,
)
async def explain(
    request: Request,
    class_name: str | None = Query(None, description="class to explain (default: the predicted one)"),
) -> Response:
    st = _state(request)
    b = st.bundle
    uploads, _ = await read_uploads(request)
    if len(uploads) != 1:
        raise ApiError(400, "one image only", f"/v1/explain takes one image, got {len(uploads)}")
    if class_name is not None and class_name not in b.classes:
        raise ApiError(400, "unknown class", f"{class_name!r} is not one of the model's classes: {b.classes}")
    # Decoding with the (smaller) explain limit first means a big image is refused before
    # Grad-CAM opens it at full size.
    await decode_all(st, uploads, per_image=st.settings.explain_max_pixels, background=True)
    if b.model is None:
        raise ApiError(
            501,
            "explain unavailable",
            "Grad-CAM needs the PyTorch weights; serve the bundle folder instead of an .onnx file",
        )
    from imgclf.analysis.explain import explain_png  # lazy: pulls in matplotlib

    if st.explain_lock is None:
        st.explain_lock = asyncio.Lock()
    eb = st.explain_bundle or b
    try:
        async with st.explain_lock:  # one Grad-CAM at a time: each holds several full-size copies
            # Its own thread and model: batches go on while a Grad-CAM runs.
            png, explained = await asyncio.get_running_loop().run_in_executor(
                st.explain_pool(),
                lambda: explain_png(eb, uploads[0].data, class_name=class_name, max_side=EXPLAIN_MAX_SIDE),
            )
    except RuntimeError as e:  # the pool was shut down under us: the server is stopping
        if "shutdown" not in str(e):
            raise
        raise ApiError(503, "shutting down", "the server is stopping; retry elsewhere") from None
    finally:
        await _release_memory_off_loop()
    header = json.dumps([{"label": c, "probability": round(p, 6)} for c, p in explained])
    return Response(png, media_type="image/png", headers={"X-Explained": header})


@router.get("/v1/model", summary="What this server serves")
async def model_info(request: Request) -> dict[str, Any]:
    st = _state(request)
    b, m, s = st.bundle, st.bundle.meta, st.settings
    return {
        "architecture": _arch(b),
        "backend": b.backend,
        "classes": b.classes,
        "input": m.get("input", {}),
        "metrics": m.get("metrics", {}),
        "sha256": b.sha256,
        "created": m.get("created"),
        "calibration": m.get("calibration"),
        "unknown_rejection": m.get("ood"),
        "task": m.get("task", "single-label"),
        "thresholds": m.get("thresholds"),
        "batching": {
            "max_batch": st.batcher.max_batch,
            "max_wait_ms": st.batcher.max_wait * 1000,
            "bulk_batch": st.batcher.bulk_batch,
        },
        "limits": {
            "max_upload_bytes": s.max_upload_bytes,
            "max_pixels": s.max_image_pixels,
            "max_request_pixels": s.max_request_pixels,
            "max_images": s.max_images,
            "max_queue": st.batcher.max_queue,
            "request_timeout_s": s.request_timeout_s,
            "max_client_requests": s.max_client_requests,
        },
    }


@router.get("/healthz", summary="Liveness")
async def healthz(request: Request) -> dict[str, Any]:
    return {"status": "ok", "queue_depth": _state(request).batcher.depth}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prom(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    st = _state(request)
    st.metrics.queue_depth.set(st.batcher.depth)
    return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(_static_dir() / "index.html", media_type="text/html")


# --------------------------------------------------------------------------- error handlers


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    _state(request).metrics.errors.labels(exc.error).inc()
    return _error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Framework errors (404, 405, malformed multipart -> 400) in the same JSON shape.
    detail = str(exc.detail)
    if exc.status_code in (404, 405):
        detail = f"{request.method} {request.url.path}: {detail}; the API is listed at /docs"
    err = ApiError(exc.status_code, _short_status(exc.status_code), detail)
    _state(request).metrics.errors.labels(err.error).inc()
    return _error_response(err)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug or a failing model, not bad input: still JSON, and uvicorn logs the traceback.
    err = ApiError(500, "internal error", f"{type(exc).__name__}: {exc}")
    _state(request).metrics.errors.labels(err.error).inc()
    return _error_response(err)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    err = ApiError(400, "invalid request", "; ".join(parts))
    _state(request).metrics.errors.labels(err.error).inc()
    return _error_response(err)


# --------------------------------------------------------------------------- the app


def _scored(b: Bundle) -> Callable[[np.ndarray], np.ndarray]:
    """The batcher's function: one row per image, the probabilities then the unknown-image score."""

    def run(batch: np.ndarray) -> np.ndarray:
        probs, scores = b.predict_scored(batch)
        return probs if scores is None else np.concatenate([probs, scores[:, None]], axis=1)

    return run


def _check_can_predict(b: Bundle) -> None:
    """A bundle that cannot predict fails now, with one line, instead of answering 500 later.

    It is also the warm-up: the ONNX Runtime session and first-call allocations are made here,
    so the first client does not pay for them.
    """
    h, w = b.pre.size
    try:
        probs, scores = b.predict_scored(np.zeros((1, h, w, b.pre.channels), np.uint8))
    except Exception as e:  # noqa: BLE001 - any failure here means the server would be useless
        raise BundleError(f"{b.path}: the model cannot predict ({type(e).__name__}: {e})") from e
    if scores is not None and not np.isfinite(scores).all():
        raise BundleError(f"{b.path}: the unknown-image score is not finite on a test image")
    if probs.shape != (1, len(b.classes)) or not np.isfinite(probs).all():
        raise BundleError(
            f"{b.path}: the model returned {probs.shape} / non-finite probabilities on a test image"
        )


@asynccontextmanager
async def _lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's own protocol
    st: ServeState = app.state.serve
    st.batcher.start()
    st.explain_lock = asyncio.Lock()
    try:
        yield
    finally:
        # uvicorn has already waited for open requests; drain whatever is still queued.
        await st.batcher.close()
        st.close_pool()


def create_app(
    bundle: str | os.PathLike | Bundle,
    settings: ServeSettings | None = None,
    *,
    backend: str | None = None,
    max_pixels: int | None = None,
    **options: Any,
) -> FastAPI:
    """Build the FastAPI app for one bundle (a path is loaded now, so errors show at startup).

    ``options`` are :class:`ServeSettings` fields (``max_batch``, ``max_upload_bytes``, ...) and
    override ``settings`` (default :data:`DEFAULTS`); ``max_pixels`` is the older name of
    ``max_image_pixels``. ``backend`` is passed to :func:`load_bundle` when ``bundle`` is a path.
    """
    if max_pixels is not None:
        options["max_image_pixels"] = max_pixels
    try:
        s = dataclasses.replace(settings or DEFAULTS, **options).validate()
    except TypeError as e:
        raise TypeError(f"create_app: {e}; options are the fields of ServeSettings") from None
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, backend=backend)
    # A server sees every batch size up to max_batch: ONNX Runtime's arena would keep the largest.
    b.ort_arena = False
    _check_can_predict(b)
    metrics = _Metrics()
    batcher = Batcher(
        _scored(b),
        max_batch=s.max_batch,
        max_wait_ms=s.max_wait_ms,
        max_queue=s.max_queue,
        on_batch=metrics.on_batch,
        bulk_batch=s.bulk_batch,
    )
    state = ServeState(
        b,
        s,
        batcher,
        metrics,
        decode_slots=s.decode_threads or min(4, os.cpu_count() or 1),
        explain_bundle=_explain_bundle(b),
    )
    app = FastAPI(
        title="imgclf",
        summary=f"Image classifier: {_arch(b)}, {len(b.classes)} classes",
        version=str(b.meta.get("versions", {}).get("imgclf") or __version__),
        lifespan=_lifespan,
    )
    app.state.serve = state
    # The older attribute names, read by Ray Serve's wrapper and by tests.
    app.state.bundle, app.state.batcher, app.state.metrics = b, batcher, metrics
    app.add_middleware(
        _LimitAndMeasure,
        max_body=s.max_upload_bytes,
        metrics=metrics,
        max_client_requests=s.max_client_requests,
    )
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")
    return app


def _arch(b: Bundle) -> str:
    arch = b.meta.get("architecture")
    return str(arch.get("name", "unknown")) if isinstance(arch, dict) else "unknown"


def _short_status(code: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(code).phrase.lower()
    except ValueError:
        return "error"


# --------------------------------------------------------------------------- running it

# Idle keep-alive connections are dropped after this many seconds.
_KEEP_ALIVE_S = 5
# h11 refuses a request head (request line + headers) larger than this: a header that never ends.
_MAX_HEADER_BYTES = 64 * 1024


def _uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """uvicorn.Config / uvicorn.run keywords for ``server``: the same for every way of serving."""
    return {
        "host": server.host,
        "port": server.port,
        "log_level": server.log_level,
        "timeout_graceful_shutdown": server.graceful_timeout,
        "timeout_keep_alive": _KEEP_ALIVE_S,
        "h11_max_incomplete_event_size": _MAX_HEADER_BYTES,
    }


def _apply_threads(server: ServerSettings, *, own_process: bool) -> None:
    """Compute threads for ONNX Runtime (environment, inherited by workers) and torch."""
    from imgclf.runtime.onnxrt import THREADS_ENV

    if server.threads:
        os.environ[THREADS_ENV] = str(server.threads)
        if server.workers == 1:  # with several workers, app_from_env sets it in each
            import torch

            torch.set_num_threads(server.threads)
    elif own_process and THREADS_ENV not in os.environ:
        # Inference and HTTP handling share the machine: measured on 2 cores, one ORT thread
        # beside the event loop beat two fighting it (docs/SERVE.md). Workers inherit this.
        os.environ[THREADS_ENV] = str(max(1, ((os.cpu_count() or 1) - 1) // server.workers))


class BackgroundServer:
    """An app under uvicorn in a daemon thread of this process: ``url``, ``app``, ``close()``.

    Also a context manager (leaving it closes). Closing is graceful: open requests finish.
    """

    def __init__(self, app: FastAPI, server: ServerSettings | None = None) -> None:
        import threading

        import uvicorn

        server = server or ServerSettings(port=0, log_level="warning")
        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, lifespan="on", **_uvicorn_options(server)))
        self._thread = threading.Thread(target=self._server.run, name="imgclf-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise RuntimeError(f"uvicorn did not start on {server.host}:{server.port} (port in use?)")
            time.sleep(0.01)
        bound = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{server.host}:{bound}"

    def close(self) -> None:
        """Stop taking connections, finish open requests and queued images, join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=60)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BackgroundServer({self.url!r})"


@contextmanager
def serve_in_thread(app: FastAPI, host: str = SERVER_DEFAULTS.host, port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields the base URL (tests, notebooks).

    ``port=0`` picks a free port. Leaving the block shuts down gracefully (open requests finish).
    """
    with BackgroundServer(app, ServerSettings(host=host, port=port, log_level="warning")) as server:
        yield server.url


def run_server(
    model: str | os.PathLike | Bundle,
    settings: ServeSettings | None = None,
    server: ServerSettings | None = None,
    *,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve ``model`` in this process until Ctrl-C / SIGTERM (what ``imgclf serve`` runs).

    ``server.workers > 1`` starts that many uvicorn processes, each loading ``model`` (a path)
    from :data:`ENV_CONFIG`. ``announce`` gets a one-line "listening on" message.
    """
    import uvicorn

    settings, server = settings or DEFAULTS, server or SERVER_DEFAULTS
    say = announce or (lambda _msg: None)
    _limit_malloc_arenas()
    _apply_threads(server, own_process=True)
    options = _uvicorn_options(server)
    if server.workers == 1:
        app = create_app(model, settings, backend=server.backend)
        say(f"http://{server.host}:{server.port}/  (API docs at /docs)")
        uvicorn.run(app, **options)
        return
    if isinstance(model, Bundle):
        raise ConfigError(
            "workers > 1 needs the bundle's path, not a loaded Bundle: each worker process loads its own copy"
        )
    # Several processes: uvicorn needs an import string; each worker rebuilds the app from the
    # environment. Load once here so a broken bundle fails with one clear line, not N tracebacks.
    load_bundle(model, backend=server.backend)
    os.environ[ENV_CONFIG] = json.dumps(
        {
            "bundle": os.path.abspath(model),
            "backend": server.backend,
            "torch_threads": server.threads,
            **dataclasses.asdict(settings),
        }
    )
    say(f"http://{server.host}:{server.port}/ with {server.workers} workers (each loads the model)")
    uvicorn.run("imgclf.serving.app:app_from_env", factory=True, workers=server.workers, **options)


def serve(
    model: str | os.PathLike | Bundle,
    *,
    host: str = SERVER_DEFAULTS.host,
    port: int = SERVER_DEFAULTS.port,
    background: bool = False,
    **settings: Any,
) -> BackgroundServer | None:
    """Serve ``model`` (a bundle path or a loaded :class:`Bundle`) over HTTP.

    ``settings`` are fields of :class:`ServeSettings` and :class:`ServerSettings`. Blocks until
    stopped, as ``imgclf serve`` does; with ``background=True`` returns a running
    :class:`BackgroundServer` (``.url``, ``.app``, ``.close()``, a context manager) served from
    a thread of this process (``port=0`` picks a free port).
    """
    app_settings, server = split_settings({"host": host, "port": port, **settings})
    if not background:
        run_server(model, app_settings, server)
        return None
    if server.workers != 1:
        raise ConfigError(
            f"background=True serves from a thread of this process; workers must be 1, got {server.workers}"
        )
    _apply_threads(server, own_process=False)
    return BackgroundServer(create_app(model, app_settings, backend=server.backend), server)


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` / ``--workers N``: options come as JSON in
    ``IMGCLF_SERVE_CONFIG`` (set by :func:`run_server`). Each worker process loads the model."""
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        raise RuntimeError(f"{ENV_CONFIG} is not set; start the server with `imgclf serve BUNDLE`")
    cfg = json.loads(raw)
    threads = cfg.pop("torch_threads", None)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return create_app(cfg.pop("bundle"), **cfg)


# Kept for callers of the older module-level names.
DEFAULT_MAX_UPLOAD_BYTES = DEFAULTS.max_upload_bytes
DEFAULT_MAX_IMAGES = DEFAULTS.max_images
DEFAULT_MAX_QUEUE = DEFAULTS.max_queue

__all__ = [
    "ApiError",
    "BackgroundServer",
    "Batcher",
    "QueueFull",
    "ServeSettings",
    "ServeState",
    "ServerSettings",
    "ShuttingDown",
    "app_from_env",
    "create_app",
    "run_server",
    "serve",
    "serve_in_thread",
]
