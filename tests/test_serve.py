"""The HTTP API on a real small bundle: results, order, parity with `imgclf predict`, bad input,
batching, back-pressure, slow clients and graceful shutdown."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imgclf import cli
from imgclf.runtime.bundle import load_bundle
from imgclf.serving.app import create_app, serve, serve_in_thread
from imgclf.serving.batcher import Batcher


@pytest.fixture(scope="module")
def bundle(sign_bundle: Path):
    return load_bundle(sign_bundle)


@pytest.fixture(scope="module")
def client(bundle) -> TestClient:
    with TestClient(create_app(bundle)) as c:
        yield c


def _files(sign_dir: Path, per_class: int = 1, classes: str = "0123456789") -> list[Path]:
    return [f for c in classes for f in sorted((sign_dir / c).iterdir())[:per_class]]


def _multipart(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def _png_header_bomb(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header claims width x height (what a decompression bomb looks like)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # IHDR data starts at byte 16 (8 signature + 4 length + 4 type); its CRC follows 13 bytes later.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _assert_error(r: httpx.Response, status: int, error: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error, body
    assert body["detail"], body
    return body


def test_predict_matches_cli_and_keeps_order(client, sign_bundle, sign_dir, capsys):
    files = _files(sign_dir, per_class=1)
    assert cli.main(["predict", str(sign_bundle), *map(str, files), "--json", "--top-k", "3"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["path"] for e in expected] == list(map(str, files))

    r = client.post("/v1/predict?top_k=3", files=_multipart(files))
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [g["filename"] for g in got] == [f.name for f in files]
    for g, e in zip(got, expected):
        assert g["label"] == e["label"]
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
        # Same batch composition as the CLI (one batch of 10), so the numbers agree to float noise.
        assert g["probability"] == pytest.approx(e["probability"], abs=1e-6)
        assert [t["probability"] for t in g["top_k"]] == pytest.approx(
            [t["probability"] for t in e["top_k"]], abs=1e-6
        )

    # Reversed upload order -> reversed results.
    r2 = client.post("/v1/predict?top_k=3", files=_multipart(files[::-1]))
    assert [g["label"] for g in r2.json()["predictions"]] == [e["label"] for e in expected][::-1]


def test_raw_body_and_top_k(client, sign_dir):
    f = _files(sign_dir, classes="7")[0]
    r = client.post("/v1/predict", content=f.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200
    p = r.json()["predictions"]
    assert len(p) == 1 and len(p[0]["top_k"]) == 5
    probs = [t["probability"] for t in p[0]["top_k"]]
    assert probs == sorted(probs, reverse=True) and p[0]["probability"] == probs[0]
    # top_k as a form field works too, and is capped at the number of classes.
    r = client.post("/v1/predict", files=_multipart([f]), data={"top_k": "50"})
    assert len(r.json()["predictions"][0]["top_k"]) == 10
    # The declared type is ignored: content decides.
    r = client.post("/v1/predict", files={"x": ("photo.txt", f.read_bytes(), "text/plain")})
    assert r.status_code == 200


def test_bad_inputs_get_json_4xx_never_500(client, sign_dir, tmp_path):
    jpg = _files(sign_dir, classes="2")[0].read_bytes()
    _assert_error(client.post("/v1/predict", content=b"just some text"), 415, "not an image")
    body = _assert_error(
        client.post("/v1/predict", files=[("file", ("ok.jpg", jpg)), ("file", ("notes.txt", b"hello"))]),
        415,
        "not an image",
    )
    assert body["file"] == "notes.txt" and body["index"] == 1 and "notes.txt" in body["detail"]
    # Truncated JPEG: the header is fine, the data is not.
    r = client.post("/v1/predict", files={"file": ("cut.jpg", jpg[: len(jpg) // 3])})
    assert r.status_code == 400 and r.json()["error"] in ("truncated image", "corrupt image data"), r.text
    assert "cut.jpg" in r.json()["detail"]
    _assert_error(client.post("/v1/predict", content=b""), 400, "no image")
    # A header claiming 50k x 50k pixels is refused before any pixel is decoded.
    r = client.post("/v1/predict", files={"file": ("bomb.png", _png_header_bomb(50_000, 50_000))})
    _assert_error(r, 413, "too many pixels")
    _assert_error(client.post("/v1/predict?top_k=0", content=jpg), 400, "invalid request")
    _assert_error(client.post("/v1/predict?top_k=abc", content=jpg), 400, "invalid request")
    _assert_error(
        client.post("/v1/predict", files={"f": ("a.jpg", jpg)}, data={"top_k": "x"}), 400, "invalid request"
    )
    # Multipart header without a boundary: a broken client, not a server error.
    r = client.post("/v1/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and r.json()["error"], r.text
    _assert_error(client.get("/v1/nothing"), 404, "not found")
    _assert_error(client.get("/v1/predict"), 405, "method not allowed")
    _assert_error(client.post("/v1/explain?class_name=banana", content=jpg), 400, "unknown class")


def test_limits_413_and_queue_full_503(bundle, sign_dir):
    files = _files(sign_dir, per_class=1, classes="0123")
    app = create_app(bundle, max_upload_bytes=60_000, max_pixels=5_000, max_images=3, max_queue=2)
    with TestClient(app) as c:
        big = b"\xff\xd8" + os.urandom(80_000)
        body = _assert_error(c.post("/v1/predict", content=big), 413, "upload too large")
        assert "60000" in body["detail"]
        # Chunked upload (no Content-Length) is cut off while streaming.
        r = c.post("/v1/predict", content=iter([big[:40_000], big[40_000:]]))
        _assert_error(r, 413, "upload too large")
        # 100x100 = 10,000 pixels > max_pixels 5,000.
        _assert_error(c.post("/v1/predict", content=files[0].read_bytes()), 413, "too many pixels")
        _assert_error(c.post("/v1/predict", files=_multipart(files)), 413, "too many images")
    app = create_app(bundle, max_queue=2)
    with TestClient(app) as c:
        _assert_error(c.post("/v1/predict", files=_multipart(files[:3])), 503, "server busy")
        assert c.post("/v1/predict", files=_multipart(files[:2])).status_code == 200


def test_model_failure_is_json_500_and_the_batcher_survives(bundle, sign_dir):
    flaky = load_bundle(bundle.path)
    calls: list[int] = []

    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        calls.append(len(batch))
        if len(calls) == 2:  # call 1 is the start-up check (which is also the warm-up)
            raise RuntimeError("simulated inference failure")
        return bundle.predict_scored(batch)

    flaky.predict_scored = predict  # the server's one inference entry (probabilities + unknown score)
    f = _files(sign_dir, classes="6")
    with TestClient(create_app(flaky), raise_server_exceptions=False) as c:
        body = _assert_error(c.post("/v1/predict", files=_multipart(f)), 500, "internal error")
        assert "simulated inference failure" in body["detail"]
        assert c.post("/v1/predict", files=_multipart(f)).status_code == 200


def test_app_can_start_twice_and_reports_backend(bundle, sign_dir):
    app = create_app(bundle)
    f = _files(sign_dir, classes="1")
    for _ in range(2):  # a second lifespan gets a fresh queue and thread pools
        with TestClient(app) as c:
            assert c.post("/v1/predict", files=_multipart(f)).status_code == 200
            assert c.get("/v1/model").json()["backend"] == bundle.backend


def test_model_health_metrics_page(client, bundle, sign_dir):
    m = client.get("/v1/model").json()
    assert m["classes"] == bundle.classes and m["sha256"] == bundle.sha256
    assert m["input"]["size"] == [48, 48] and m["architecture"] == "smallervggnet"
    assert "val_accuracy" in m["metrics"] or "test_accuracy" in m["metrics"]
    assert client.get("/healthz").json()["status"] == "ok"
    client.post("/v1/predict", files=_multipart(_files(sign_dir, classes="45")))
    text = client.get("/metrics").text
    assert 'imgclf_requests_total{path="/v1/predict",status="200"}' in text
    assert "imgclf_batch_size_bucket" in text and "imgclf_request_latency_seconds_bucket" in text
    assert "imgclf_errors_total" in text or "imgclf_errors" in text
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and client.get(asset).status_code == 200
    # No external assets: the page must work offline.
    assert "http://" not in page.text and "https://" not in page.text
    assert "openapi" in client.get("/docs").text.lower()


def test_explain_returns_overlay_png_at_original_size(client, sign_dir):
    f = _files(sign_dir, classes="5")[0]
    r = client.post("/v1/explain", files={"file": (f.name, f.read_bytes())})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == Image.open(f).size
    (drawn,) = json.loads(r.headers["x-explained"])  # the predicted class and its probability
    pred = client.post("/v1/predict", content=f.read_bytes()).json()["predictions"][0]
    assert drawn["label"] == pred["label"] and drawn["probability"] == pytest.approx(
        pred["probability"], abs=1e-4
    )
    r = client.post("/v1/explain?class_name=3", content=f.read_bytes())
    assert r.status_code == 200 and json.loads(r.headers["x-explained"])[0]["label"] == "3"
    _assert_error(client.post("/v1/explain", files=_multipart([f, f])), 400, "one image only")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_requests_are_batched(bundle, sign_dir):
    files = _files(sign_dir, per_class=2)
    app = create_app(bundle, max_batch=32, max_wait_ms=50)

    async def hammer(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            return await asyncio.gather(*(c.post("/v1/predict", files=_multipart([f])) for f in files))

    with serve_in_thread(app) as url:
        rs = asyncio.run(hammer(url))
        text = httpx.get(url + "/metrics").text
    assert all(r.status_code == 200 for r in rs)
    assert [r.json()["predictions"][0]["filename"] for r in rs] == [f.name for f in files]
    n_batches = _metric(text, "imgclf_batch_size_count")
    assert _metric(text, "imgclf_batch_size_sum") == len(files)
    assert n_batches < len(files) / 2, f"{len(files)} requests ran in {n_batches} batches"


def test_slow_client_does_not_stall_others(bundle, sign_dir):
    jpg = _files(sign_dir, classes="9")[0].read_bytes()
    with serve_in_thread(create_app(bundle)) as url:
        host, port = url.removeprefix("http://").split(":")
        # Promise 100 kB, send 10 bytes, then go quiet (a stalled or malicious uploader).
        slow = socket.create_connection((host, int(port)))
        try:
            slow.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 100000\r\n\r\n" + jpg[:10]
            )
            time.sleep(0.2)
            t0 = time.perf_counter()
            for _ in range(5):
                r = httpx.post(url + "/v1/predict", content=jpg, timeout=10)
                assert r.status_code == 200
            assert time.perf_counter() - t0 < 5
        finally:
            slow.close()


def test_shutdown_drains_queued_requests(bundle, sign_dir):
    files = _files(sign_dir, per_class=1)
    real = bundle.predict_scored

    def slow_predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        time.sleep(1.0)  # long enough that the other three requests arrive and queue behind it
        return real(batch)

    slow_bundle = load_bundle(bundle.path)
    slow_bundle.predict_scored = slow_predict
    app = create_app(slow_bundle, max_batch=1, max_wait_ms=0)
    results: list[httpx.Response | BaseException] = []

    def send(f: Path, url: str) -> None:
        try:
            results.append(httpx.post(url + "/v1/predict", files=_multipart([f]), timeout=30))
        except BaseException as e:  # noqa: BLE001 - recorded and asserted below
            results.append(e)

    with serve_in_thread(app) as url:
        threads = [threading.Thread(target=send, args=(f, url)) for f in files[:4]]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        # All three behind the first must be queued: a request the server has not accepted yet
        # when shutdown starts is closed unanswered, which is uvicorn's behaviour, not a lost one
        # (waiting for two let the fourth race the shutdown: seen once in CI).
        while app.state.batcher.depth < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.batcher.depth >= 3, "requests never queued"
        # Leaving the block asks uvicorn to exit while requests are queued.
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results), results


def test_batcher_close_drains_and_refuses_new_work():
    from concurrent.futures import ThreadPoolExecutor

    from imgclf.serving.batcher import ShuttingDown

    sizes: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch.reshape(len(batch), -1).astype(np.float32)

    async def scenario() -> list:
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(predict, pool, max_batch=4, max_wait_ms=20)
            b.incoming = 1  # pretend more requests are decoding, so the batcher waits to fill
            tasks = [asyncio.ensure_future(b.submit([np.full((1, 1, 1), i, np.uint8)])) for i in range(10)]
            await asyncio.sleep(0)
            await b.close()
            with pytest.raises(ShuttingDown):
                await b.submit([np.zeros((1, 1, 1), np.uint8)])
            return [float(r[0][0]) for r in await asyncio.gather(*tasks)]

    assert asyncio.run(scenario()) == list(range(10))
    assert sizes == [4, 4, 2]


def test_cli_serve_starts_and_stops(sign_bundle, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = [sys.executable, "-m", "imgclf", "serve", str(sign_bundle), "--port", str(port)]
    proc = subprocess.Popen(exe, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert r.json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{port}" in out


def test_cli_serve_bad_bundle_is_one_line(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no such bundle" in err and "Traceback" not in err
    assert cli.main(["serve", str(tmp_path), "--max-batch", "0"]) == 2


def test_cli_flags_come_from_serve_settings():
    import dataclasses

    from imgclf.serving.settings import ServerSettings, ServeSettings

    args = cli.build_parser().parse_args(["serve", "b"])
    for cls in (ServeSettings, ServerSettings):
        for f in dataclasses.fields(cls):
            assert getattr(args, f.name) == f.default, f.name
    # The older flag names still work.
    args = cli.build_parser().parse_args(["serve", "b", "--max-pixels", "7", "--max-upload-mb", "1"])
    assert args.max_image_pixels == 7 and args.max_upload_mb == 1
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--max-request-pixels" in help_text and "--request-timeout-s" in help_text


def _assert_json_error(r, status: int, error: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error, body
    return body


def test_request_pixel_budget_explain_limit_and_broken_bundle(bundle, sign_dir):
    from imgclf.core.errors import BundleError

    files = _files(sign_dir, per_class=1, classes="0123")  # 100x100 each
    app = create_app(bundle, max_request_pixels=25_000, explain_max_pixels=5_000)
    with TestClient(app) as c:
        assert c.post("/v1/predict", files=_multipart(files[:2])).status_code == 200  # 20,000 pixels
        body = _assert_json_error(
            c.post("/v1/predict", files=_multipart(files[:3])), 413, "request too large"
        )
        assert "30,000 pixels" in body["detail"]
        _assert_json_error(c.post("/v1/explain", content=files[0].read_bytes()), 413, "too many pixels")
    broken = load_bundle(bundle.path)
    broken.predict_scored = lambda batch: (
        np.full((len(batch), len(broken.classes)), np.nan, np.float32),
        None,
    )
    with pytest.raises(BundleError, match="non-finite"):
        create_app(broken)


def test_slow_body_gets_408_and_a_disconnect_is_not_a_500(bundle, sign_dir):
    app = create_app(bundle, request_timeout_s=0.5)
    jpg = _files(sign_dir)[0].read_bytes()
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(jpg)}\r\n\r\n".encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head + jpg[:100])  # ... and then nothing more
            reply = s.recv(4096).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408") and "request timeout" in reply
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head + jpg[:100])
        time.sleep(0.3)  # the client left mid-body
        metrics = httpx.get(url + "/metrics").text
        assert (
            'status="500"' not in metrics
            and 'imgclf_errors_total{error="client disconnected"} 1.0' in metrics
        )
        assert httpx.post(url + "/v1/predict", content=jpg).status_code == 200


def test_serve_in_background_twice_in_one_process(bundle, sign_bundle):
    from imgclf.core.errors import ConfigError

    a = serve(bundle, port=0, background=True, max_batch=4)
    try:
        with serve(sign_bundle, port=0, background=True, log_level="warning") as b:
            assert a.url != b.url and a.app is not b.app
            for server in (a, b):
                r = httpx.get(server.url + "/healthz", timeout=10)
                assert r.status_code == 200 and r.json()["status"] == "ok"
            assert httpx.get(a.url + "/v1/model").json()["batching"]["max_batch"] == 4
        with pytest.raises(httpx.TransportError):
            httpx.get(b.url + "/healthz", timeout=2)
    finally:
        a.close()
    with pytest.raises(TypeError, match="no_such_option"):
        serve(bundle, port=0, background=True, no_such_option=1)
    with pytest.raises(ConfigError, match="--max-batch"):
        serve(bundle, port=0, background=True, max_batch=0)
    with pytest.raises(ConfigError, match="workers"):
        serve(bundle, port=0, background=True, workers=2)


def test_flooding_client_gets_429_while_another_is_served(bundle, sign_dir):
    jpg = _files(sign_dir, classes="4")[0].read_bytes()
    real = bundle.predict_scored
    slow_bundle = load_bundle(bundle.path)
    slow_bundle.predict_scored = lambda batch: (time.sleep(0.3), real(batch))[1]  # keeps requests in flight
    app = create_app(slow_bundle, max_batch=1, max_wait_ms=0, max_client_requests=2)

    async def scenario(url: str) -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        flood = httpx.AsyncClient(base_url=url, timeout=30)  # from 127.0.0.1
        other = httpx.AsyncClient(
            base_url=url, timeout=30, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        )
        async with flood, other:
            burst = [asyncio.create_task(flood.post("/v1/predict", content=jpg)) for _ in range(6)]
            await asyncio.sleep(0.1)  # the flood's first two are being served now
            served = await other.post("/v1/predict", content=jpg)
            flooded = await asyncio.gather(*burst)
            after = await flood.post("/v1/predict", content=jpg)  # nothing in flight: served again
        return flooded, served, after

    with serve_in_thread(app) as url:
        flooded, served, after = asyncio.run(scenario(url))
        metrics = httpx.get(url + "/metrics").text
        limits = httpx.get(url + "/v1/model").json()["limits"]
    codes = sorted(r.status_code for r in flooded)
    assert codes == [200, 200, 429, 429, 429, 429], codes
    refused = next(r for r in flooded if r.status_code == 429)
    assert refused.json()["error"] == "too many requests" and refused.headers["retry-after"] == "1"
    assert "--max-client-requests" in refused.json()["detail"]
    assert served.status_code == 200 and served.json()["predictions"][0]["label"]
    assert after.status_code == 200
    assert 'imgclf_requests_total{path="/v1/predict",status="429"} 4.0' in metrics
    assert limits["max_client_requests"] == 2
    assert all(not m.in_flight for m in _middlewares(app))  # finished clients leave the table


def _middlewares(app) -> list:
    """The app's _LimitAndMeasure instances (built when the app first served)."""
    out, node = [], app.middleware_stack
    while node is not None:
        if hasattr(node, "in_flight"):
            out.append(node)
        node = getattr(node, "app", None)
    assert out, "no _LimitAndMeasure in the middleware stack"
    return out


def test_explain_runs_beside_batches_not_on_the_inference_thread(bundle, sign_dir, monkeypatch):
    """A slow Grad-CAM must not hold predictions: it has its own thread and model."""
    import imgclf.analysis.explain as explain_mod

    f = _files(sign_dir, classes="6")[0]
    app = create_app(bundle)
    real_explain = explain_mod.explain_png
    seen: dict[str, object] = {}

    def slow_explain(b, *a, **kw):
        seen["thread"], seen["bundle"] = threading.current_thread().name, b
        time.sleep(1.5)
        return real_explain(b, *a, **kw)

    monkeypatch.setattr(explain_mod, "explain_png", slow_explain)
    with serve_in_thread(app) as url:
        jpg = f.read_bytes()
        t = threading.Thread(
            target=lambda: seen.setdefault("r", httpx.post(url + "/v1/explain", content=jpg, timeout=30))
        )
        t.start()
        time.sleep(0.3)  # the Grad-CAM is running now
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/predict", content=jpg, timeout=30)
        waited = time.perf_counter() - t0
        t.join()
    assert r.status_code == 200 and waited < 1.0, f"predict waited {waited:.2f} s behind Grad-CAM"
    assert seen["r"].status_code == 200 and seen["r"].headers["content-type"] == "image/png"
    assert str(seen["thread"]).startswith("imgclf-explain")
    st = app.state.serve
    assert seen["bundle"] is st.explain_bundle
    # ONNX Runtime predicts without the torch network, so Grad-CAM may share it; eager needs a copy.
    assert (st.explain_bundle.model is bundle.model) == (bundle.backend == "onnxruntime")


def test_batcher_cuts_a_big_request_so_a_small_one_goes_next():
    """64 images of one request, then one image of another: the one image is in the next
    batch (beside at most a quarter batch of the big request); a request alone gets full batches."""
    from concurrent.futures import ThreadPoolExecutor

    batches: list[list[int]] = []
    gate = threading.Event()

    def predict(batch: np.ndarray) -> np.ndarray:
        gate.wait(10)  # the first batch holds the thread while both requests queue
        batches.append([int(v) for v in batch.reshape(len(batch), -1)[:, 0]])
        return batch.reshape(len(batch), -1).astype(np.float32)

    def images(value: int, n: int) -> list[np.ndarray]:
        return [np.full((1, 1, 1), value, np.uint8) for _ in range(n)]

    async def scenario() -> tuple[list, list]:
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(predict, pool, max_batch=32, max_wait_ms=0)
            warm = asyncio.ensure_future(b.submit(images(7, 1)))  # occupies the inference thread
            await asyncio.sleep(0.05)
            big = asyncio.ensure_future(b.submit(images(1, 64)))
            await asyncio.sleep(0)
            small = asyncio.ensure_future(b.submit(images(2, 1)))
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.gather(warm, big, small)
            n_before = len(batches)
            alone = await b.submit(images(3, 64))
            await b.close()
            return batches[n_before:], [float(r[0]) for r in alone]

    alone_batches, alone = asyncio.run(scenario())
    contended = batches[: -len(alone_batches)]
    assert contended[0] == [7]
    assert 2 in contended[1] and contended[1].count(1) <= 8, contended[1]
    assert sum(c.count(1) for c in contended) == 64 and len(contended[1]) <= 9
    assert alone_batches == [[3] * 32, [3] * 32] and alone == [3.0] * 64
