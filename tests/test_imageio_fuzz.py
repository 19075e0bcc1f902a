"""open_image on thousands of mutated real images, and on each awkward kind of valid image."""

from __future__ import annotations

import io
import random
import resource
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.core.imageio import ImageDecodeError, open_image

# PIL warns about the corrupt files it still reads; pytest would show each one.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")

N_MUTANTS = 3000
MAX_PIXELS = 4_000_000  # keeps the worst legal decode (a fuzzed header asking for the limit) at 12 MB


def _real_images(sign_dir: Path, n: int = 3) -> list[Image.Image]:
    files = [sorted((sign_dir / c).iterdir())[0] for c in ("0", "4", "8")][:n]
    return [Image.open(f).convert("RGB") for f in files]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _i16(arr: np.ndarray) -> Image.Image:
    """A 16-bit greyscale image (Image.fromarray no longer takes mode='I;16')."""
    return Image.frombytes("I;16", (arr.shape[1], arr.shape[0]), arr.astype("<u2").tobytes())


@pytest.fixture(scope="module")
def seeds(sign_dir: Path) -> list[bytes]:
    """Real photos encoded in every format and mode open_image claims to handle."""
    out = []
    for k, im in enumerate(_real_images(sign_dir)):
        small = im.resize((48, 40))
        out.append(sorted((sign_dir / "0").iterdir())[k].read_bytes())  # original JPEG, EXIF and all
        for fmt in ("PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA"):
            out.append(_encode(small, fmt))
        out.append(_encode(small.convert("P"), "PNG", transparency=0))
        out.append(_encode(small.convert("LA"), "PNG"))
        out.append(_encode(small.convert("CMYK"), "JPEG"))
        out.append(_encode(small.convert("L"), "JPEG", progressive=True))
        out.append(_encode(small, "GIF", save_all=True, append_images=[small.rotate(90)], duration=50))
        i16 = _i16(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
        out.append(_encode(i16, "PNG"))
        out.append(_encode(small, "TIFF", compression="tiff_deflate"))
    return out


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    d = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # truncated
        return bytes(d[: rng.randrange(len(d))])
    if kind == 1:  # scattered bit flips
        for _ in range(rng.randint(1, 12)):
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
    elif kind == 2:  # header bytes replaced
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(min(len(d), 64))] = rng.randrange(256)
    elif kind == 3:  # a size-like field set huge
        i = rng.randrange(min(len(d), 256))
        d[i : i + 4] = struct.pack(">I", rng.choice([0, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    elif kind == 4:  # another format's header on this body
        head = rng.choice(seeds)[: rng.randrange(2, 40)]
        d[: len(head)] = head
    elif kind == 5:  # a chunk duplicated or removed
        i, j = sorted(rng.randrange(len(d)) for _ in range(2))
        d = d[:i] + d[j:] if rng.random() < 0.5 else d[:j] + d[i:j] + d[j:]
    else:  # random bytes inserted
        i = rng.randrange(len(d))
        d[i:i] = rng.randbytes(rng.randint(1, 64))
    return bytes(d)


def test_mutated_images_give_an_image_or_the_typed_error(seeds: list[bytes]) -> None:
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    escaped: list[str] = []
    slowest = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        for n in range(N_MUTANTS):
            blob = _mutate(rng, rng.choice(seeds), seeds)
            channels = 1 if n % 3 == 0 else 3
            size = (32, 32) if n % 2 else None
            t0 = time.perf_counter()
            try:
                img = open_image(blob, channels=channels, size=size, max_pixels=MAX_PIXELS, name=f"m{n}")
            except ImageDecodeError as e:
                assert e.reason and e.source == f"m{n}"
                outcomes[e.reason] = outcomes.get(e.reason, 0) + 1
            except Exception as e:  # noqa: BLE001 - the point of the test
                escaped.append(f"mutant {n}: {type(e).__name__}: {e}")
            else:
                assert img.mode == ("L" if channels == 1 else "RGB")
                assert img.width > 0 and img.height > 0 and img.width * img.height <= MAX_PIXELS
                np.asarray(img)  # fully loaded: no lazy decode left to fail later
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            slowest = max(slowest, time.perf_counter() - t0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert not escaped, escaped[:10]
    # Both outcomes happen a lot: the mutations are neither all harmless nor all fatal.
    assert outcomes.get("ok", 0) > N_MUTANTS // 10
    assert sum(v for k, v in outcomes.items() if k != "ok") > N_MUTANTS // 3
    assert {"truncated image", "not an image"} <= set(outcomes)
    assert peak < 64 << 20, f"Python heap peaked at {peak / 2**20:.0f} MB"
    assert rss_growth_mb < 256, f"resident memory grew by {rss_growth_mb:.0f} MB"
    assert slowest < 5.0, f"one mutant took {slowest:.1f} s"


def test_pixel_bomb_headers_refused_before_decoding() -> None:
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    for w, h in [(50_000, 50_000), (12_000, 9_000)]:  # above PIL's own limit; above ours only
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        png += chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
        with pytest.raises(ImageDecodeError) as e:
            open_image(png, max_pixels=100_000_000)
        assert e.value.reason == "too many pixels"
    # the limit is configurable: a 3000x3000 header passes 10M but not 1M
    big = _encode(Image.new("RGB", (3000, 3000)), "PNG")
    assert open_image(big, max_pixels=10_000_000).size == (3000, 3000)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        open_image(big, max_pixels=1_000_000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_exif_orientation_matches_pillows_exif_transpose(sign_dir: Path, fmt: str) -> None:
    from PIL import ImageOps

    im = _real_images(sign_dir, 1)[0].resize((30, 20))
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        data = _encode(im, fmt, exif=exif.tobytes())
        want = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        got = open_image(data)
        assert got.size == want.size == ((20, 30) if o >= 5 else (30, 20)), (fmt, o)
        assert np.array_equal(np.asarray(got), np.asarray(want)), (fmt, o)


def test_awkward_valid_images_decode(sign_dir: Path, tmp_path: Path) -> None:
    im = _real_images(sign_dir, 1)[0].resize((60, 40))
    # EXIF orientation 6 (rotate 90 degrees clockwise): 60x40 stored, 40x60 shown
    exif = Image.Exif()
    exif[0x0112] = 6
    out = open_image(_encode(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (40, 60)
    # palette with transparency, alpha, CMYK, 16-bit grey, animated (first frame)
    rgba = im.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited onto white
    assert np.asarray(open_image(_encode(rgba, "PNG"))).min() == 255
    assert open_image(_encode(im.convert("CMYK"), "JPEG")).mode == "RGB"
    i16 = _i16(np.linspace(0, 65535, 60 * 40).reshape(40, 60).astype(np.uint16))
    g = np.asarray(open_image(_encode(i16, "PNG"), channels=1))
    assert g.min() == 0 and g.max() == 255  # full 16-bit range rescaled, not clipped
    first, second = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    gif = _encode(first, "GIF", save_all=True, append_images=[second])
    assert np.asarray(open_image(gif))[0, 0].tolist() == [255, 0, 0]
    # content, not extension, decides; and a stream works as well as a path
    p = tmp_path / "photo.txt"
    p.write_bytes(_encode(im, "PNG"))
    assert open_image(p).size == (60, 40)
    assert open_image(io.BytesIO(p.read_bytes()), channels=1).mode == "L"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"hello, this is text", "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not an image"),
        (b"%PDF-1.4\n1 0 obj<<>>endobj\n", "not an image"),
    ],
)
def test_non_images_are_typed_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    p = tmp_path / "file.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageDecodeError) as e:
        open_image(p)
    assert e.value.reason == reason and str(p) in str(e.value)


def test_missing_path_and_directory_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="file not found"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="is a directory"):
        open_image(tmp_path)
