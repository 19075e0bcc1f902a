"""One image-opening function for the whole project (train, predict, evaluate, serve).

Files are recognised by content, never by extension. Every failure is an
:class:`ImageDecodeError` with a reason a person can act on.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from imgclf.core.errors import ImageDecodeError

# 8000 x 8000 photos are real in scraped sets; anything much larger is treated as a bomb.
DEFAULT_MAX_PIXELS = 100_000_000

ImageSource = str | os.PathLike | bytes | IO[bytes] | Image.Image

# Raster formats we decode. Everything else (EPS/PDF/WMF run external programs or vector
# code; FITS, GRIB, MPEG and friends are not photos) is refused as "not an image".
# MPO is what PIL calls multi-picture JPEGs from phone cameras.
SUPPORTED_FORMATS = (
    "JPEG",
    "MPO",
    "PNG",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "WEBP",
    "PPM",
    "ICO",
    "TGA",
    "PCX",
    "QOI",
    "AVIF",
    "JPEG2000",
    "PSD",
    "SGI",
)

# PIL warns (UserWarning) about the corrupt files it can still read and about large images
# (DecompressionBombWarning); we check the pixel count ourselves against ``max_pixels`` and
# report real failures as ImageDecodeError, so these only add noise. A module-level filter,
# because warnings.catch_warnings() is not thread-safe and decoding runs in threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)


# Extensions used only to *list* candidate files in folders; content decides the rest.
IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".gif",
    ".bmp",
    ".dib",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".ico",
    ".tga",
}


def _name(src: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return "<bytes>" if isinstance(src, (bytes, bytearray)) else "<stream>"


def _read_bytes(src: ImageSource, label: str, max_bytes: int | None) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.exists():
            raise ImageDecodeError(label, "file not found")
        if p.is_dir():
            raise ImageDecodeError(label, "is a directory, not an image")
        try:
            size = p.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise ImageDecodeError(label, "file too large", f"{size} bytes > limit {max_bytes}")
            data = p.read_bytes()
        except OSError as e:
            raise ImageDecodeError(label, "cannot read file", str(e)) from e
    else:
        try:
            data = src.read(max_bytes + 1 if max_bytes is not None else -1)
        except (OSError, ValueError) as e:
            raise ImageDecodeError(label, "cannot read stream", str(e)) from e
        if not isinstance(data, (bytes, bytearray)):
            raise ImageDecodeError(label, "not an image", f"stream returned {type(data).__name__}, not bytes")
        data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError(label, "file too large", f"> limit {max_bytes} bytes")
    if not data:
        raise ImageDecodeError(label, "empty file")
    return data


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (1, L, P, RGBA, CMYK, I;16, F, LA, ...) to L (1 channel) or RGB (3)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit/float data: rescale the real range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip((arr - lo) * scale, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr8, mode="L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Composite onto white: transparent regions of scraped PNGs are usually background.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def open_image(
    src: ImageSource,
    *,
    channels: int = 3,
    size: tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode ``src`` into a fully loaded PIL image in L (channels=1) or RGB (channels=3).

    ``size`` (w, h) is a hint: JPEGs are decoded at the smallest DCT scale that is still
    at least that large (draft mode), which is several times faster for big photos.
    EXIF orientation is applied; animated files give their first frame.
    Raises :class:`ImageDecodeError` for anything that is not a usable image.
    """
    label = _name(src, name)
    if isinstance(src, Image.Image):
        img = src
    else:
        data = _read_bytes(src, label, max_bytes)
        try:
            img = Image.open(io.BytesIO(data), formats=open_formats())
        except UnidentifiedImageError as e:
            raise ImageDecodeError(label, "not an image", "unrecognised file content") from e
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(label, "too many pixels", str(e)) from e
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
            # A file cut short inside its header (big EXIF blocks make this common) is truncated.
            cut = isinstance(e, (EOFError, struct.error)) or "truncated" in str(e).lower()
            reason = "truncated image" if cut else "corrupt image header"
            raise ImageDecodeError(label, reason, f"{type(e).__name__}: {e}") from e
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError(label, "image has no pixels", f"{w}x{h}")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(
                label, "too many pixels", f"{w}x{h} > limit {max_pixels}; raise max_pixels to allow"
            )
        if getattr(img, "is_animated", False):
            img.seek(0)
        if size is not None and img.format in ("JPEG", "MPO"):
            # Orientation may swap axes, so ask for enough pixels on both.
            side = max(size)
            img.draft(img.mode if img.mode in ("RGB", "L") else None, (side, side))
        prev = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = prev
        img = _apply_orientation(img)
        return to_mode(img, channels)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        text = str(e)
        reason = "truncated image" if "truncated" in text.lower() else "corrupt image data"
        raise ImageDecodeError(label, reason, f"{type(e).__name__}: {text}") from e
    except MemoryError as e:
        raise ImageDecodeError(label, "too many pixels", "out of memory while decoding") from e
    except Exception as e:  # noqa: BLE001 - decoders raise odd types on fuzzed data
        raise ImageDecodeError(label, "corrupt image data", f"{type(e).__name__}: {e}") from e


_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag, as ``ImageOps.exif_transpose`` does.

    exif_transpose also rewrites the EXIF block into the result, which cost ~4 ms of a
    ~25 ms decode of a 12 MP camera photo (bench/decode_speed.py); only pixels matter here.
    """
    op = _ORIENTATION.get(img.getexif().get(0x0112, 1))
    return img.transpose(op) if op is not None else img


def resize(img: Image.Image, size: tuple[int, int], method: str = "bilinear") -> Image.Image:
    """Resize to exactly (w, h), ignoring aspect ratio as the tutorials' cv2.resize does."""
    methods = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
        "area": Image.Resampling.BOX,
        "lanczos": Image.Resampling.LANCZOS,
    }
    if method not in methods:
        raise ValueError(f"unknown resize method {method!r}; choose one of {sorted(methods)}")
    if img.size == tuple(size):
        return img
    # reducing_gap makes big downscales fast (two-step) with no visible loss.
    return img.resize(tuple(size), methods[method], reducing_gap=3.0)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header without decoding it; None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=open_formats()) as img:
                return img.size
    except Exception:  # noqa: BLE001 - any failure: let the real decoder report it precisely
        return None
