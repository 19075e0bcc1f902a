"""Scheduling under a flood (issue 17): a small request never waits behind a bulk one's batches.

The properties are checked as orderings and batch contents, not as latencies (the machine is
shared, so a timing threshold would flake): a one-image request submitted while a 64-image
request is in flight is answered before the bulk request finishes, in a batch of its own, and
a stream of small requests cannot starve a bulk one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from imgclf.runtime.bundle import load_bundle
from imgclf.serving.app import create_app, serve_in_thread
from imgclf.serving.batcher import BULK_EVERY, Batcher


def _images(value: int, n: int) -> list[np.ndarray]:
    return [np.full((1, 1, 1), value, np.uint8) for _ in range(n)]


def _recording_predict(batches: list[list[int]], gate: threading.Event, started: threading.Event):
    def predict(batch: np.ndarray) -> np.ndarray:
        started.set()
        gate.wait(10)  # the first batch holds the inference thread until the test lets it go
        batches.append([int(v) for v in batch.reshape(len(batch), -1)[:, 0]])
        return batch.reshape(len(batch), -1).astype(np.float32)

    return predict


def test_single_image_request_overtakes_a_bulk_request_in_flight():
    batches: list[list[int]] = []
    gate, started = threading.Event(), threading.Event()

    async def scenario() -> tuple[bool, list[float], list[float]]:
        with ThreadPoolExecutor(1) as pool:
            b = Batcher(
                _recording_predict(batches, gate, started), pool, max_batch=32, max_wait_ms=0, bulk_batch=4
            )
            big = asyncio.ensure_future(b.submit(_images(1, 64)))
            while not started.is_set():  # the bulk request's first batch is running
                await asyncio.sleep(0.005)
            small = asyncio.ensure_future(b.submit(_images(2, 1)))
            await asyncio.sleep(0.02)
            gate.set()
            small_rows = await small
            bulk_done_first = big.done()
            big_rows = await big
            await b.close()
            return bulk_done_first, [float(r[0]) for r in small_rows], [float(r[0]) for r in big_rows]

    bulk_done_first, small_rows, big_rows = asyncio.run(scenario())
    assert not bulk_done_first, "the one-image request waited for the whole 64-image request"
    assert small_rows == [2.0] and big_rows == [1.0] * 64
    # The bulk batch in flight, then the small image alone, then the rest of the bulk request.
    assert batches[0] == [1] * 4 and batches[1] == [2], batches[:3]
    assert all(len(x) <= 4 for x in batches) and sum(len(x) for x in batches) == 65


def test_small_requests_cannot_starve_a_bulk_request():
    batches: list[list[int]] = []
    gate, started = threading.Event(), threading.Event()

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            # max_batch 4: a request of more than one image is bulk; small batches hold 4 images.
            b = Batcher(
                _recording_predict(batches, gate, started), pool, max_batch=4, max_wait_ms=0, bulk_batch=2
            )
            warm = asyncio.ensure_future(b.submit(_images(9, 1)))
            while not started.is_set():
                await asyncio.sleep(0.005)
            big = asyncio.ensure_future(b.submit(_images(1, 8)))
            await asyncio.sleep(0)
            smalls = [asyncio.ensure_future(b.submit(_images(2, 1))) for _ in range(40)]
            await asyncio.sleep(0.02)
            gate.set()
            await asyncio.gather(warm, big, *smalls)
            await b.close()

    asyncio.run(scenario())
    kinds = "".join("B" if 1 in x else "S" for x in batches[1:])
    assert all(len(x) <= 2 for x in batches if 1 in x) and all(1 not in x or 2 not in x for x in batches)
    # While both wait, at least every BULK_EVERY-th batch carries the bulk request.
    assert "S" * BULK_EVERY not in kinds[: kinds.rindex("B")], kinds
    assert kinds.count("B") == 4


def test_lone_bulk_request_still_cut_into_bulk_batches():
    seen: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return batch.reshape(len(batch), -1).astype(np.float32)

    async def scenario() -> list[np.ndarray]:
        b = Batcher(predict, max_batch=32, max_wait_ms=0, bulk_batch=4)
        rows = await b.submit(_images(3, 10))  # bulk: more than a quarter of a batch
        rows += await b.submit(_images(4, 8))  # small: a quarter of a batch, one batch
        await b.close()
        return rows

    rows = asyncio.run(scenario())
    assert seen == [4, 4, 2, 8] and [float(r[0]) for r in rows] == [3.0] * 10 + [4.0] * 8
    with pytest.raises(ValueError):
        Batcher(predict, bulk_batch=0)


def test_single_photo_answered_before_a_64_photo_request_over_http(sign_bundle, sign_dir):
    """The issue's case end to end: a 64-image upload is in flight (slowed to ~2 s of
    inference), a one-image request from another client is answered before it, alone in its
    batch, and every batch of the bulk request holds at most bulk_batch images."""
    bulk_photo = next((sign_dir / "1").iterdir()).read_bytes()
    small_photo = next((sign_dir / "7").iterdir()).read_bytes()
    b = load_bundle(sign_bundle)
    marker = b.prepare(small_photo)
    real = b.predict_scored
    sizes: list[tuple[int, bool]] = []

    def slow(batch: np.ndarray):
        sizes.append((len(batch), any(np.array_equal(x, marker) for x in batch)))
        time.sleep(0.03 * len(batch))  # the 64 images take ~2 s: a wide margin
        return real(batch)

    b.predict_scored = slow
    app = create_app(b)  # default settings: max_batch 32, bulk_batch 4
    sizes.clear()  # the start-up check ran one batch
    done: dict[str, float] = {}

    async def scenario(url: str) -> tuple[httpx.Response, httpx.Response]:
        bulk_client = httpx.AsyncClient(
            base_url=url, timeout=60, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        )
        async with httpx.AsyncClient(base_url=url, timeout=60) as small_client, bulk_client:

            async def post(name: str, client: httpx.AsyncClient, **kw) -> httpx.Response:
                r = await client.post("/v1/predict", **kw)
                done[name] = time.perf_counter()
                return r

            files = [("f", (f"{i}.jpg", bulk_photo, "image/jpeg")) for i in range(64)]
            bulk = asyncio.create_task(post("bulk", bulk_client, files=files))
            deadline = time.monotonic() + 30
            while not sizes and time.monotonic() < deadline:  # the bulk request's batches began
                await asyncio.sleep(0.01)
            small = await post("small", small_client, content=small_photo)
            return await bulk, small

    with serve_in_thread(app) as url:
        bulk, small = asyncio.run(scenario(url))
        batching = httpx.get(url + "/v1/model").json()["batching"]
    assert bulk.status_code == 200 and len(bulk.json()["predictions"]) == 64
    assert small.status_code == 200 and small.json()["predictions"][0]["label"]
    assert done["small"] < done["bulk"], "the one-image request waited for the 64-image one"
    assert [n for n, has_small in sizes if has_small] == [1], sizes
    assert all(n <= 4 for n, _ in sizes) and sum(n for n, _ in sizes) == 65, sizes
    assert batching["bulk_batch"] == 4
