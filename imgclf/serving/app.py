"""HTTP serving: a FastAPI app with dynamic batching, a web page and Prometheus metrics.

Request path: the framework reads the whole upload (so a slow client only holds its own
connection), images are decoded in a thread pool, then one asyncio *batcher* task gathers up to
``max_batch`` images, waiting at most ``max_wait_ms`` for more, and runs
:meth:`Bundle.predict_batch` in a single dedicated inference thread. Each request awaits the
futures of its own images, so results come back in request order.

Bad input never gives a 500: oversized bodies get 413, undecodable data 400/415, all with a JSON
body ``{"error": ..., "detail": ...}`` that names the problem.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgclf.core.imageio import ImageDecodeError
from imgclf.core.version import __version__
from imgclf.runtime.bundle import Bundle, load_bundle

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# A 3024x3024 phone photo is 9 MP; 40 MP leaves room for big cameras while refusing bombs.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_QUEUE = 1024
ENV_CONFIG = "IMGCLF_SERVE_CONFIG"

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
            "filename": "hand.jpg",
        }
    ]
}
_KNOWN_PATHS = {"/", "/v1/predict", "/v1/explain", "/v1/model", "/healthz", "/metrics", "/docs"}


class ApiError(HTTPException):
    """An HTTP error rendered as ``{"error": short, "detail": longer}``."""

    def __init__(self, status: int, error: str, detail: str = "", **extra: Any) -> None:
        super().__init__(status_code=status, detail=detail)
        self.error = error
        self.extra = extra


class QueueFull(Exception):
    """The batcher's bounded queue has no room for this request's images."""


class ShuttingDown(Exception):
    """The batcher stopped taking work because the server is shutting down."""


_STOP = object()


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future


class Batcher:
    """Gathers single images from many requests into batches for one inference thread.

    ``predict`` takes a uint8 NHWC array and returns (N, K) probabilities. The queue is bounded
    (``max_queue`` images); :meth:`submit` raises :class:`QueueFull` instead of waiting, so an
    overloaded server answers 503 quickly rather than building an unbounded backlog.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        executor: ThreadPoolExecutor | None = None,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = DEFAULT_MAX_QUEUE,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.predict = predict
        # One thread owns the model, so batches (and anything sent through run_exclusive, such
        # as Grad-CAM hooks) never run on it at the same time.
        self.executor = executor
        self._own_executor = executor is None
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        # Unbounded underneath; the bound is checked in submit() so a multi-image request is
        # admitted whole or not at all (the event loop is single-threaded, so no race).
        self._queue: asyncio.Queue | None = None  # made in start(): it belongs to one event loop
        self._task: asyncio.Task | None = None
        self._closing = False
        # Requests that are decoding right now: their images are about to arrive, so waiting up
        # to max_wait for them pays off; with none, waiting would only add latency.
        self.incoming = 0

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the batching task on the running loop (again after :meth:`close` too)."""
        if self._task is not None:
            return
        self._closing = False
        self._queue = asyncio.Queue()
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-infer")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="imgclf-batcher")

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the inference thread, between batches."""
        if self._closing:
            raise ShuttingDown()
        self.start()
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def submit(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Queue ``images`` and wait for their probability rows (same order)."""
        if self._closing:
            raise ShuttingDown()
        self.start()  # no-op when the app's lifespan already started it
        assert self._queue is not None
        if self._queue.qsize() + len(images) > self.max_queue:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        items = [_Item(im, loop.create_future()) for im in images]
        for it in items:
            self._queue.put_nowait(it)
        return list(await asyncio.gather(*(it.future for it in items)))

    async def close(self) -> None:
        """Stop taking new work, finish everything already queued, then stop the task."""
        self._closing = True
        if self._task is not None and self._queue is not None:
            self._queue.put_nowait(_STOP)
            await self._task
            self._task = None
        if self._own_executor and self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None

    async def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        loop = asyncio.get_running_loop()
        batch, stop = [first], False
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0 or self.incoming == 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch, stop = await self._gather(first)
            # Clients that went away (cancelled futures) cost no inference.
            batch = [it for it in batch if not it.future.done()]
            if batch:
                t0 = time.perf_counter()
                try:
                    probs = await loop.run_in_executor(
                        self.executor, self.predict, np.stack([it.image for it in batch])
                    )
                except Exception as e:  # noqa: BLE001 - handed to every waiting request
                    for it in batch:
                        if not it.future.done():
                            it.future.set_exception(e)
                else:
                    for it, row in zip(batch, probs):
                        if not it.future.done():
                            it.future.set_result(row)
                if self.on_batch:
                    self.on_batch(len(batch), time.perf_counter() - t0)
            if stop:
                return


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
            "Time of one predict_batch call",
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

    def __init__(self, app: Any, max_body: int, metrics: _Metrics) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

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
            seen = 0

            async def receive_limited() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(self.max_body)
                return message

            await self.app(scope, receive_limited, send_wrapper)
        finally:
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - t0)


def _error_response(err: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": err.error, "detail": err.detail, **err.extra}
    return JSONResponse(body, status_code=err.status_code, headers=headers)


def _static_dir() -> Path:
    return Path(str(resources.files("imgclf") / "static"))


@dataclass
class _Upload:
    name: str
    data: bytes


def create_app(
    bundle: str | os.PathLike | Bundle,
    *,
    max_batch: int = 32,
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_queue: int = DEFAULT_MAX_QUEUE,
    decode_threads: int | None = None,
    backend: str | None = None,
) -> FastAPI:
    """Build the FastAPI app for one bundle (a path is loaded now, so errors show at startup).

    ``max_upload_bytes`` bounds a whole request body, ``max_pixels`` each decoded image,
    ``max_images`` the images in one request and ``max_queue`` the images waiting for inference.
    ``backend`` is passed to :func:`load_bundle` when ``bundle`` is a path.
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, backend=backend)
    metrics = _Metrics()
    pools: dict[str, ThreadPoolExecutor] = {}

    def decode_pool() -> ThreadPoolExecutor:
        # Made on first use and again after a shutdown, so the app object can be started twice.
        if "decode" not in pools:
            pools["decode"] = ThreadPoolExecutor(
                max_workers=decode_threads or min(4, os.cpu_count() or 1), thread_name_prefix="imgclf-decode"
            )
        return pools["decode"]

    batcher = Batcher(
        b.predict_batch,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        on_batch=metrics.on_batch,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's own protocol
        batcher.start()
        # Warm up on the inference thread (builds the ONNX Runtime session, first-call
        # allocations) so the first client does not pay for it.
        h, w = b.pre.size
        await batcher.run_exclusive(lambda: b.predict_batch(np.zeros((1, h, w, b.pre.channels), np.uint8)))
        try:
            yield
        finally:
            # uvicorn has already waited for open requests; drain whatever is still queued.
            await batcher.close()
            if "decode" in pools:
                pools.pop("decode").shutdown(wait=True)

    app = FastAPI(
        title="imgclf",
        summary=f"Image classifier: {_arch(b)}, {len(b.classes)} classes",
        version=str(b.meta.get("versions", {}).get("imgclf") or __version__),
        lifespan=lifespan,
    )
    app.state.bundle = b
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.add_middleware(_LimitAndMeasure, max_body=max_upload_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(exc.error).inc()
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Framework errors (404, 405, malformed multipart -> 400) in the same JSON shape.
        detail = str(exc.detail)
        if exc.status_code in (404, 405):
            detail = f"{request.method} {request.url.path}: {detail}; the API is listed at /docs"
        err = ApiError(exc.status_code, _short_status(exc.status_code), detail)
        metrics.errors.labels(err.error).inc()
        return _error_response(err)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug or a failing model, not bad input: still JSON, and uvicorn logs the traceback.
        err = ApiError(500, "internal error", f"{type(exc).__name__}: {exc}")
        metrics.errors.labels(err.error).inc()
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        err = ApiError(400, "invalid request", "; ".join(parts))
        metrics.errors.labels(err.error).inc()
        return _error_response(err)

    async def read_uploads(request: Request) -> tuple[list[_Upload], dict[str, str]]:
        """All uploaded files (any field name) or the raw body; plus plain form fields."""
        ctype = request.headers.get("content-type", "")
        fields: dict[str, str] = {}
        uploads: list[_Upload] = []
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=max_images + 1)
            for key, value in form.multi_items():
                if isinstance(value, StarletteUploadFile):
                    uploads.append(_Upload(value.filename or key, await value.read()))
                else:
                    fields[key] = str(value)
        else:
            body = await request.body()
            if body:
                uploads.append(_Upload("body", body))
        if not uploads:
            raise ApiError(
                400,
                "no image",
                "send image files as multipart/form-data (any field name), or one image as the raw body",
            )
        if len(uploads) > max_images:
            raise ApiError(
                413, "too many images", f"{len(uploads)} images in one request; the limit is {max_images}"
            )
        return uploads, fields

    def decode(up: _Upload, index: int) -> np.ndarray:
        return b.prepare(up.data, max_pixels=max_pixels, max_bytes=max_upload_bytes, name=up.name)

    async def decode_all(uploads: list[_Upload]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        futs = [loop.run_in_executor(decode_pool(), decode, up, i) for i, up in enumerate(uploads)]
        results = await asyncio.gather(*futs, return_exceptions=True)
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

    raw_body_doc = {
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

    @app.post(
        "/v1/predict",
        summary="Classify one or more images",
        description="Multipart files (any field name, results in upload order) or one raw image body.",
        openapi_extra=raw_body_doc,
        responses={200: {"content": {"application/json": {"example": _PREDICT_EXAMPLE}}}},
    )
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, description="classes per image (default 5)"),
    ) -> JSONResponse:
        uploads, fields = await read_uploads(request)
        k = parse_top_k(top_k, fields)
        batcher.incoming += 1
        try:
            images = await decode_all(uploads)
        finally:
            batcher.incoming -= 1
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
            metrics.queue_depth.set(batcher.depth)
        results = b.top_k(np.stack(rows), k)
        for up, r in zip(uploads, results):
            r["filename"] = up.name
        # A plain JSONResponse skips FastAPI's per-field encoding: less work on the event loop.
        return JSONResponse({"predictions": results})

    @app.post(
        "/v1/explain",
        summary="Grad-CAM overlay PNG for one image",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
        openapi_extra=raw_body_doc,
    )
    async def explain(
        request: Request,
        class_name: str | None = Query(None, description="class to explain (default: the predicted one)"),
    ) -> Response:
        uploads, _ = await read_uploads(request)
        if len(uploads) != 1:
            raise ApiError(400, "one image only", f"/v1/explain takes one image, got {len(uploads)}")
        if class_name is not None and class_name not in b.classes:
            raise ApiError(
                400, "unknown class", f"{class_name!r} is not one of the model's classes: {b.classes}"
            )
        # Decoding with the limits first means a bomb is refused before Grad-CAM opens it.
        await decode_all(uploads)
        if b.model is None:
            raise ApiError(
                501,
                "explain unavailable",
                "Grad-CAM needs the PyTorch weights; serve the bundle folder instead of an .onnx file",
            )
        from imgclf.analysis.explain import overlay_png  # lazy: pulls in matplotlib

        try:
            png = await batcher.run_exclusive(lambda: overlay_png(b, uploads[0].data, class_name=class_name))
        except ShuttingDown:
            raise ApiError(503, "shutting down", "the server is stopping; retry elsewhere") from None
        return Response(png, media_type="image/png")

    @app.get("/v1/model", summary="What this server serves")
    async def model_info() -> dict[str, Any]:
        m = b.meta
        return {
            "architecture": _arch(b),
            "backend": b.backend,
            "classes": b.classes,
            "input": m.get("input", {}),
            "metrics": m.get("metrics", {}),
            "sha256": b.sha256,
            "created": m.get("created"),
            "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000},
            "limits": {
                "max_upload_bytes": max_upload_bytes,
                "max_pixels": max_pixels,
                "max_images": max_images,
                "max_queue": batcher.max_queue,
            },
        }

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue_depth": batcher.depth}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prom() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        metrics.queue_depth.set(batcher.depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    static = _static_dir()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=static), name="static")
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


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields the base URL (tests, notebooks).

    ``port=0`` picks a free port. Leaving the block shuts down gracefully (open requests finish).
    """
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="imgclf-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port} (port in use?)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` / ``--workers N``: options come as JSON in
    ``IMGCLF_SERVE_CONFIG`` (set by ``imgclf serve``). Each worker process loads the model."""
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        raise RuntimeError(f"{ENV_CONFIG} is not set; start the server with `imgclf serve BUNDLE`")
    cfg = json.loads(raw)
    threads = cfg.pop("torch_threads", None)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return create_app(cfg.pop("bundle"), **cfg)


__all__ = [
    "ApiError",
    "Batcher",
    "QueueFull",
    "ShuttingDown",
    "app_from_env",
    "create_app",
    "serve_in_thread",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
]
