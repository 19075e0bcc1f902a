"""Data sources (folder, IDX, scikit-learn digits), decoding with an on-disk cache, splits.

Flow: :func:`index_source` lists items and labels without decoding; :func:`decode_items`
turns them into uint8 arrays at the model's size (cached by file content);
:func:`split_indices` makes stratified, seeded, optionally group-aware splits.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.errors import DataError
from imgclf.core.files import canonical_split, display_path, fill_split, find_split_dirs, walk_files
from imgclf.core.imageio import ImageDecodeError
from imgclf.core.preprocess import Preprocess, load_uint8

log = logging.getLogger("imgclf")

BUILTINS = ("mnist", "fashion-mnist", "digits")

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Published MD5s of the *uncompressed* IDX files (independent of gzip settings).
IDX_MD5 = {
    "mnist": {
        "train_images": "6bbc9ace898e44ae57da46a324031adb",
        "train_labels": "a25bea736e30d166cdddb491f175f624",
        "test_images": "2646ac647ad5339dbf082846283269ea",
        "test_labels": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
        "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
        "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

IDX_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}


def cache_root(cache_dir: str | None = None) -> Path:
    """$IMGCLF_CACHE_DIR, else ~/.cache/imgclf (XDG_CACHE_HOME respected)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("IMGCLF_CACHE_DIR"):
        return Path(os.environ["IMGCLF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgclf"


@dataclass
class SourceIndex:
    """Items of a source, listed but not decoded.

    ``items`` are file paths (folder sources) or ``name:split:i`` ids (built-ins, whose
    pixels are in ``arrays``). ``split`` holds a predefined split per item, or "" if none.
    """

    name: str
    kind: str  # folder | idx | digits
    classes: list[str]
    items: list[str]
    labels: np.ndarray
    split: np.ndarray
    native_channels: int
    root: str = ""
    arrays: np.ndarray | None = None  # built-ins: uint8 (N, H, W)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Multi-label sources: (N, L) uint8 multi-hot over ``classes`` (the label names); ``labels``
    # then holds a stratification key per item (its label set's id), not a class index.
    targets: np.ndarray | None = None
    reader: Callable[[str], bytes] | None = None  # item -> bytes for items not on disk (tar members)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def multi_label(self) -> bool:
        return self.targets is not None

    def targets_at(self, idx: np.ndarray) -> np.ndarray | None:
        """Multi-label sets of items ``idx`` ((n, L) multi-hot), or None for a single-label source."""
        return None if self.targets is None else self.targets[idx]

    @property
    def has_predefined_split(self) -> bool:
        return bool((self.split != "").any())

    def relpath(self, item: str) -> str:
        if self.kind == "folder" and self.root:
            try:
                return os.path.relpath(item, self.root)
            except ValueError:
                return item
        return item


# --------------------------------------------------------------------------- folders


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_class_files(
    class_dir: Path, skipped: list[tuple[str, str]], seen: set[tuple[int, int]]
) -> list[Path]:
    files, bad = walk_files(class_dir, seen)
    skipped.extend(bad)
    return files


def index_folder(root: str | Path, label_sep: str | None = None) -> SourceIndex:
    """List ``root/{class}/*`` or ``root/{train,val,test}/{class}/*``; classes sorted by name.

    With ``label_sep`` the folders name label sets (``red_dress`` -> {red, dress}): a multi-label index.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder. Give a folder of class folders or one of {BUILTINS}.")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder. Expected the layout {root}/<class>/<image>.")
    splits = find_split_dirs(root)
    if "train" in splits:
        parts = {s: _class_dirs(d) for s, d in splits.items()}
    else:
        parts = {"": _class_dirs(root)}
    classes = sorted({d.name for dirs in parts.values() for d in dirs})
    if not classes:
        raise DataError(
            f"{root}: no class folders found. Expected {root}/<class>/<image> "
            f"(e.g. {root}/cat/001.jpg) or {root}/train/<class>/<image>."
        )
    cidx = {c: i for i, c in enumerate(classes)}
    items, labels, split = [], [], []
    skipped: list[tuple[str, str]] = []
    # Folders above the class folders count as walked: a link back up is a loop, not more data.
    seen = {(st.st_dev, st.st_ino) for st in (p.stat() for p in (root, *splits.values()))}
    for s, dirs in parts.items():
        for d in dirs:
            for f in _list_class_files(d, skipped, seen):
                items.append(str(f))
                labels.append(cidx[d.name])
                split.append(s)
    if not items:
        raise DataError(f"{root}: class folders {classes} contain no files.")
    if len(classes) < 2:
        raise DataError(f"{root}: found one class ({classes[0]}); a classifier needs at least two.")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataError(
            f"{root}: class folder(s) {', '.join(display_path(c) for c in empty)} hold no files; "
            "add images or remove the folder (a class without images cannot be learnt)"
        )
    index = SourceIndex(
        name=str(root),
        kind="folder",
        classes=classes,
        items=items,
        labels=np.asarray(labels, dtype=np.int64),
        split=np.asarray(split, dtype=object),
        native_channels=3,
        root=str(root),
        skipped=skipped,
    )
    return index if label_sep is None else _folders_as_label_sets(index, label_sep)


def _folders_as_label_sets(index: SourceIndex, sep: str) -> SourceIndex:
    """Split each class folder name on ``sep`` into a label set (multi-label)."""
    if not sep:
        raise DataError("--label-sep: give a non-empty separator, e.g. --label-sep _")
    if not any(sep in c for c in index.classes):
        raise DataError(
            f"{index.root}: no class folder name contains {sep!r}, so every image would get one label; "
            f"name folders like red{sep}dress, give a labels file (path,labels), or drop --multi-label"
        )
    sets = [[p for p in c.split(sep) if p] for c in index.classes]
    names = sorted({p for ps in sets for p in ps})
    col = {n: i for i, n in enumerate(names)}
    per_folder = np.zeros((len(index.classes), len(names)), dtype=np.uint8)
    for f, ps in enumerate(sets):
        per_folder[f, [col[p] for p in ps]] = 1
    targets = per_folder[index.labels]
    return _as_multi_label(index, names, targets)


def _as_multi_label(index: SourceIndex, names: list[str], targets: np.ndarray) -> SourceIndex:
    if len(names) < 2:
        raise DataError(f"{index.name}: found {len(names)} label(s); multi-label needs at least two")
    # The stratification key: the label set's id, so splits and subsets keep every combination.
    _, key = np.unique(targets, axis=0, return_inverse=True)
    index.classes, index.targets, index.labels = names, targets, key.reshape(-1).astype(np.int64)
    return index


# --------------------------------------------------------------------------- manifests

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
LABEL_LIST_SEP = "|"


def _manifest_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV (header row), JSON-lines or Parquet manifest."""
    import csv
    import json

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error types for damaged files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        return [(i + 1, r) for i, r in enumerate(rows)]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the manifest ({e}); save it as UTF-8 text") from None
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f'{path} line {n}: expected an object like {{"path": ..., "labels": [...]}}')
            out.append((n, row))
        return out
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
        raise DataError(
            f"{path} line 1: the header must name a 'path' column and a 'label' or 'labels' column "
            "(optional 'split'), e.g. path,labels"
        )
    return [
        (n, {(k or "").strip(): v for k, v in r.items()}) for n, r in enumerate(reader, 2) if any(r.values())
    ]


def _row_labels(row: dict[str, Any], where: str) -> list[str]:
    raw = row.get("labels", row.get("label"))
    if raw is None:
        raise DataError(f"{where}: no 'label' or 'labels' value")
    if isinstance(raw, list):
        parts = [str(x).strip() for x in raw]
    elif isinstance(raw, str | int):
        parts = [p.strip() for p in str(raw).split(LABEL_LIST_SEP)]
    else:
        raise DataError(f"{where}: labels={raw!r}; give text like 'red|dress' or a list")
    return [p for p in parts if p]


def index_manifest(path: str | Path, multi_label: bool = False) -> SourceIndex:
    """A CSV / JSON-lines / Parquet manifest of ``path,label`` (or ``path,labels`` with ``|`` between
    labels) plus an optional ``split`` column; paths are relative to the manifest's folder.

    Missing files are skipped and reported; an image with no label is allowed only with ``multi_label``.
    """
    path = Path(path)
    root = path.parent
    rows = _manifest_rows(path)
    if not rows:
        raise DataError(f"{path}: the manifest lists no images")
    items: list[str] = []
    sets: list[list[str]] = []
    split: list[str] = []
    skipped: list[tuple[str, str]] = []
    for n, row in rows:
        where = f"{path} line {n}"
        p = row.get("path")
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{where}: empty or missing 'path'")
        labels = _row_labels(row, where)
        if not multi_label and len(labels) != 1:
            what = "no label" if not labels else f"{len(labels)} labels ({'|'.join(labels)})"
            raise DataError(f"{where}: {what}; single-label needs exactly one (or add --multi-label)")
        s = str(row.get("split") or "").strip().lower()
        canon = canonical_split(s)
        if canon is None:
            raise DataError(f"{where}: split={s!r}; use train, val or test (or leave it empty)")
        f = Path(p.strip())
        f = f if f.is_absolute() else root / f
        if not f.is_file():
            skipped.append((str(f), f"listed in {path.name} line {n} but not found"))
            continue
        items.append(str(f))
        sets.append(labels)
        split.append(canon)
    if not items:
        raise DataError(f"{path}: none of the {len(rows)} listed files exists (paths are relative to {root})")
    names = sorted({x for ls in sets for x in ls})
    col = {c: i for i, c in enumerate(names)}
    index = SourceIndex(
        name=str(path),
        kind="folder",
        classes=names,
        items=items,
        labels=np.asarray([col[ls[0]] if ls else -1 for ls in sets], dtype=np.int64),
        split=_split_filled(split, path.name),
        native_channels=3,
        root=str(root),
        skipped=skipped,
    )
    if not multi_label:
        if len(names) < 2:
            raise DataError(f"{path}: found one class ({names[0]}); a classifier needs at least two")
        return index
    targets = np.zeros((len(items), len(names)), dtype=np.uint8)
    for i, ls in enumerate(sets):
        targets[i, [col[x] for x in ls]] = 1
    return _as_multi_label(index, names, targets)


# --------------------------------------------------------------------------- IDX


def read_idx(data: bytes) -> np.ndarray:
    """Parse an uncompressed IDX file (ubyte only, as MNIST uses)."""
    if len(data) < 4:
        raise DataError("IDX file too short")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError("not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"IDX size mismatch: header says {dims}, found {arr.size} values")
    return arr.reshape(dims)


def _idx_search_dirs(name: str, cache_dir: str | None) -> list[Path]:
    dirs = []
    if os.environ.get("IMGCLF_DATA_DIR"):
        dirs.append(Path(os.environ["IMGCLF_DATA_DIR"]) / name)
    dirs.append(cache_root(cache_dir) / "datasets" / name)
    dirs.append(Path("/usr/share/datasets") / name)
    return dirs


def _download(url: str, dest: Path, md5: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise DataError(
            f"could not download {url} ({e}). Put the IDX .gz files in "
            f"$IMGCLF_DATA_DIR/<name>/ or {dest.parent} and try again."
        ) from e
    if hashlib.md5(gzip.decompress(blob)).hexdigest() != md5:
        raise DataError(f"checksum mismatch for {url}: download corrupted; try again")
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(blob)
    os.replace(tmp, dest)


def _load_idx_dir(d: Path, name: str | None, verify: bool) -> dict[str, np.ndarray]:
    out = {}
    for key, fn in IDX_FILES.items():
        p = d / fn
        if not p.exists() and (d / fn[:-3]).exists():
            raw = (d / fn[:-3]).read_bytes()
        else:
            try:
                raw = gzip.decompress(p.read_bytes())
            except (OSError, EOFError) as e:
                raise DataError(f"{p}: cannot read gzip ({e}); delete it to re-fetch") from e
        if verify and name in IDX_MD5 and hashlib.md5(raw).hexdigest() != IDX_MD5[name][key]:
            raise DataError(f"{p}: checksum mismatch with the published {name} file; delete it to re-fetch")
        out[key] = read_idx(raw)
    return out


def _has_idx(d: Path) -> bool:
    return all((d / fn).exists() or (d / fn[:-3]).exists() for fn in IDX_FILES.values())


def index_idx(name_or_dir: str, cache_dir: str | None = None, download: bool = True) -> SourceIndex:
    """MNIST / Fashion-MNIST (by name) or any folder holding the four IDX files."""
    p = Path(name_or_dir)
    if name_or_dir in IDX_MD5:
        name = name_or_dir
        found = next((d for d in _idx_search_dirs(name, cache_dir) if _has_idx(d)), None)
        if found is None:
            if not download:
                raise DataError(f"{name} not found in {[str(d) for d in _idx_search_dirs(name, cache_dir)]}")
            found = cache_root(cache_dir) / "datasets" / name
            for key, fn in IDX_FILES.items():
                if not (found / fn).exists():
                    _download(IDX_URLS[name] + fn, found / fn, IDX_MD5[name][key])
        arrays = _load_idx_dir(found, name, verify=True)
    else:
        name, found = p.name, p
        arrays = _load_idx_dir(p, None, verify=False)
    if name == "fashion-mnist" or "fashion" in name.lower():
        classes = list(FASHION_CLASSES)
    else:
        classes = [str(i) for i in range(int(arrays["train_labels"].max()) + 1)]
    imgs = np.concatenate([arrays["train_images"], arrays["test_images"]])
    labels = np.concatenate([arrays["train_labels"], arrays["test_labels"]]).astype(np.int64)
    ntr, nte = len(arrays["train_labels"]), len(arrays["test_labels"])
    items = [f"{name}:train:{i}" for i in range(ntr)] + [f"{name}:test:{i}" for i in range(nte)]
    split = np.asarray(["train"] * ntr + ["test"] * nte, dtype=object)
    return SourceIndex(name, "idx", classes, items, labels, split, 1, str(found), arrays=imgs)


def index_digits() -> SourceIndex:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to 0-255; works offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    n = len(imgs)
    return SourceIndex(
        "digits",
        "digits",
        [str(i) for i in range(10)],
        [f"digits:{i}" for i in range(n)],
        d.target.astype(np.int64),
        np.asarray([""] * n, dtype=object),
        1,
        arrays=imgs,
    )


def _split_filled(split: list[str], name: str) -> np.ndarray:
    """A manifest's or shards' per-sample splits, those left blank beside named ones as train."""
    filled, n = fill_split(split)
    if n:
        log.info("%s: %d samples without a split are training images", name, n)
    return np.asarray(filled, dtype=object)


def index_source(
    spec: str, cache_dir: str | None = None, *, multi_label: bool = False, label_sep: str | None = None
) -> SourceIndex:
    """Resolve a ``--data`` value: a built-in name, an IDX folder, an image folder or a manifest.

    ``multi_label``: label sets from folder names split on ``label_sep``, or from a manifest's
    ``labels`` column.
    """
    p = Path(spec)
    if p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file():
        return index_manifest(p, multi_label)
    from imgclf.data import tarsource

    if tarsource.is_tar_spec(spec):
        if multi_label:
            raise DataError(f"--data {spec}: tar shards are single-label; for --multi-label give label-set "
                            "folders or a labels file (path,labels)")  # fmt: skip
        t = tarsource.list_tars(spec)
        split = _split_filled(list(t.split), Path(spec).name)
        return SourceIndex(t.name, "tar", t.classes, t.items, t.labels, split, 3, t.root, reader=t.read)
    if multi_label:
        if spec in BUILTINS or (p.is_dir() and _has_idx(p)):
            raise DataError(f"--data {spec}: a single-label dataset; --multi-label needs label-set folders "
                            "(red_dress/) or a labels file (path,labels)")  # fmt: skip
        if not p.is_dir():
            raise DataError(f"--data {spec!r}: no such folder or labels file (.csv, .jsonl, .parquet)")
        return index_folder(p, label_sep or "_")
    if spec == "digits":
        return index_digits()
    if spec in IDX_MD5:
        return index_idx(spec, cache_dir)
    if p.is_dir() and _has_idx(p):
        return index_idx(spec, cache_dir)
    if not p.exists():
        raise DataError(
            f"--data {spec!r}: not a folder and not a built-in dataset. "
            f"Built-ins: {', '.join(BUILTINS)}; or a folder laid out as <folder>/<class>/<image>."
        )
    return index_folder(p)


# --------------------------------------------------------------------------- decoding


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Decoded:
    """Decoded uint8 images for a subset of a source."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    items: list[str]  # item ids / paths, aligned with images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    targets: np.ndarray | None = None  # multi-label: (N, L) uint8 multi-hot


class DecodeCache:
    """uint8 arrays on disk keyed by file content and target size, stored as .npy (no pickle)."""

    def __init__(self, root: Path, pre: Preprocess) -> None:
        self.dir = root / "decoded" / pre.cache_key()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        p = self._path(key)
        if not p.exists():
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged cache entry is re-decoded

    def put(self, key: str, arr: np.ndarray) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, p)


def decode_items(
    index: SourceIndex,
    idx: np.ndarray,
    pre: Preprocess,
    *,
    cache_dir: str | None = None,
    use_cache: bool = True,
    workers: int = 2,
    max_pixels: int | None = None,
    progress: bool = True,
    desc: str = "decode",
) -> Decoded:
    """Decode items ``idx`` of ``index`` at ``pre``'s size; unreadable files are reported, not fatal."""
    from PIL import Image
    from tqdm import tqdm

    idx = np.asarray(idx, dtype=np.int64)
    h, w = pre.size
    out = np.empty((len(idx), h, w, pre.channels), dtype=np.uint8)
    ok = np.ones(len(idx), dtype=bool)
    failed: list[tuple[str, str]] = []

    if index.arrays is not None:
        src = index.arrays
        if src.shape[1:3] == (h, w) and pre.channels == 1:
            out[:, :, :, 0] = src[idx]
        else:
            for j, i in enumerate(tqdm(idx, desc=desc, disable=not progress, leave=False)):
                out[j] = load_uint8(Image.fromarray(src[i]), pre)
        items = [index.items[i] for i in idx]
        return Decoded(out, index.labels[idx], items, targets=index.targets_at(idx))

    cache = DecodeCache(cache_root(cache_dir), pre) if use_cache else None
    mp = max_pixels if max_pixels is not None else 100_000_000

    def work(j: int) -> tuple[int, np.ndarray | None, str]:
        path = index.items[idx[j]]
        try:
            blob = index.reader(path) if index.reader else Path(path).read_bytes()
        except OSError as e:
            return j, None, f"cannot read file ({e})"
        key = content_hash(blob) if cache else ""
        if cache:
            arr = cache.get(key)
            if arr is not None and arr.shape == (h, w, pre.channels):
                return j, arr, ""
        try:
            arr = load_uint8(blob, pre, max_pixels=mp, name=path)
        except ImageDecodeError as e:
            return j, None, e.reason + (f" ({e.detail})" if e.detail else "")
        if cache:
            try:
                cache.put(key, arr)
            except OSError as e:  # a read-only cache must not stop training
                log.debug("cache write failed: %s", e)
        return j, arr, ""

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        it = ex.map(work, range(len(idx)))
        for j, arr, err in tqdm(it, total=len(idx), desc=desc, disable=not progress, leave=False):
            if arr is None:
                ok[j] = False
                failed.append((index.items[idx[j]], err))
            else:
                out[j] = arr
    keep = np.flatnonzero(ok)
    return Decoded(
        out[keep] if len(keep) < len(idx) else out,
        index.labels[idx[keep]],
        [index.items[idx[k]] for k in keep],
        failed,
        index.targets_at(idx[keep]),
    )


# --------------------------------------------------------------------------- splits

# Class balance, as `imgclf inspect` and the trainer's warnings judge it: a class with fewer
# training images than MIN_CLASS_IMAGES is too small to learn; a largest class SEVERE_IMBALANCE
# times the smallest needs --class-weights auto (or more images of the small classes).
MIN_CLASS_IMAGES = 5
SEVERE_IMBALANCE = 10


def split_indices(
    labels: np.ndarray,
    fractions: dict[str, float],
    seed: int = 42,
    groups: np.ndarray | None = None,
    targets: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Stratified, seeded split of ``range(len(labels))`` into ``train`` plus ``fractions`` keys.

    With ``groups`` (one id per item; equal ids = near-duplicates), every group lands
    wholly in one split; a group is stratified by its first member's label. With ``targets``
    (multi-label, (N, L) multi-hot) the split is iterative stratification over the labels.
    """
    if targets is not None:
        return _split_multi_label(np.asarray(targets), fractions, seed, groups)
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(n)
    groups = np.asarray(groups)
    # unique groups in first-appearance order, each with its members
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(inverse):
        members.setdefault(int(g), []).append(i)
    out: dict[str, list[int]] = {k: [] for k in ["train", *fractions]}
    for c in np.unique(labels):
        cgroups = [g for g in range(len(first)) if labels[first[g]] == c]
        cgroups = [cgroups[i] for i in rng.permutation(len(cgroups))]
        total = sum(len(members[g]) for g in cgroups)
        pos = 0
        taken = 0
        for name, frac in fractions.items():
            want = int(round(total * frac))
            if frac > 0 and want == 0 and total - taken > 1:
                want = 1  # every class appears in every requested split when possible
            got = 0
            while pos < len(cgroups) and got < want and total - taken - len(members[cgroups[pos]]) >= 1:
                out[name].extend(members[cgroups[pos]])
                got += len(members[cgroups[pos]])
                taken += len(members[cgroups[pos]])
                pos += 1
        for g in cgroups[pos:]:
            out["train"].extend(members[g])
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _split_multi_label(
    targets: np.ndarray, fractions: dict[str, float], seed: int, groups: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Iterative stratification (Sechidis et al. 2011, via ``iterative-stratification``) over groups:
    a group carries the union of its members' labels and lands wholly in one split. Fractions
    count groups, not images (near-duplicate groups are small)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    n = len(targets)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    inverse = inverse.reshape(-1)
    g_targets = np.zeros((len(uniq), targets.shape[1]), dtype=np.int64)
    np.maximum.at(g_targets, inverse, targets.astype(np.int64))
    left = np.arange(len(uniq))
    left_frac = 1.0
    chosen: dict[str, np.ndarray] = {}
    for i, (name, frac) in enumerate(fractions.items()):
        want = frac / left_frac if left_frac > 0 else 0.0
        if frac <= 0 or len(left) < 2 or want >= 1:
            chosen[name] = np.zeros(0, dtype=np.int64)
            continue
        n_take = min(max(1, int(round(want * len(left)))), len(left) - 1)  # train keeps at least one group
        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_take, random_state=seed + i)
        rest, take = next(splitter.split(np.zeros(len(left)), g_targets[left]))
        chosen[name], left = left[take], left[rest]
        left_frac -= frac
    chosen = {"train": left, **chosen}
    return {name: np.flatnonzero(np.isin(inverse, g)).astype(np.int64) for name, g in chosen.items()}


def stratified_subset(labels: np.ndarray, n: int, seed: int = 42) -> np.ndarray:
    """Indices (into ``labels``) of a stratified random subset of size about ``n``."""
    if n >= len(labels):
        return np.arange(len(labels))
    frac = n / len(labels)
    parts = split_indices(labels, {"keep": frac}, seed)
    return parts["keep"]
