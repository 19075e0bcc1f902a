"""The decoded store: uint8 NHWC shards on disk, read back memory-mapped.

The first pass decodes each image once (through :func:`imgclf.core.preprocess.load_uint8`, the
same call :func:`imgclf.data.sources.decode_items` makes) and appends it to a shard: a raw
``.npy`` file of shape (rows, H, W, C) readable with ``np.load(path, mmap_mode="r")``. An index
(``index.json``, written atomically) maps each image's content hash to (shard, row). The store
lives in ``<cache>/store/<Preprocess.cache_key()>/``, so a later run, and every epoch, reads
shards only; files that were added since are decoded into a new shard, removed ones are simply
no longer referenced. A shard whose size or header disagrees with the index (truncated,
overwritten) is deleted and its images decoded again; ``verify_store`` also compares each
shard's blake2b checksum. :class:`StoreArray` is a read-only array over the shards that gathers
just the rows asked for, so training needs memory for a batch, not for the data set.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.errors import DataError
from imgclf.core.files import atomic_write_bytes
from imgclf.core.imageio import ImageDecodeError
from imgclf.core.preprocess import Preprocess, load_uint8
from imgclf.data import sources as D

log = logging.getLogger("imgclf")

FORMAT = 1
# Fixed .npy header length: the shape is rewritten in place when a shard is closed, so the header
# must not change size (64-byte aligned, as numpy pads it).
HEADER_BYTES = 128
DEFAULT_SHARD_MB = 256
INDEX = "index.json"
# Every live StoreArray holds a shared flock on this file; compact and clear need it exclusively, so
# they refuse while a run reads the store (readers take no lock on the index, and map shards lazily).
READERS = ".readers"
# Files hashed and decoded per batch of thread-pool work: bounds the results held at once.
CHUNK = 256


def store_root(cache_dir: str | None = None) -> Path:
    """The folder holding one store per preprocessing key."""
    return D.cache_root(cache_dir) / "store"


def _npy_header(shape: tuple[int, ...]) -> bytes:
    body = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(int(s) for s in shape)}, }}"
    pad = HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise DataError(f"decoded store: shape {shape} does not fit the shard header")
    return (
        b"\x93NUMPY\x01\x00"
        + struct.pack("<H", HEADER_BYTES - 10)
        + body.encode("latin1")
        + b" " * pad
        + b"\n"
    )


def _file_hash(path: Path, offset: int = HEADER_BYTES) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (a cold read for benchmarks)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class DecodedStore:
    """The shards and index for one preprocessing key; writers hold :meth:`locked`."""

    def __init__(self, root: Path, pre: Preprocess, shard_mb: float = DEFAULT_SHARD_MB) -> None:
        self.dir = Path(root) / pre.cache_key()
        self.key = pre.cache_key()
        self.shape = (pre.size[0], pre.size[1], pre.channels)
        self.row_bytes = int(np.prod(self.shape))
        self.rows_per_shard = max(1, int(shard_mb * 2**20) // self.row_bytes)

    # ------------------------------------------------------------------ index

    def shard_path(self, sid: int | str) -> Path:
        return self.dir / f"shard-{int(sid):05d}.npy"

    def empty_index(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": self.key, "shape": list(self.shape), "next_shard": 0,
                "shards": {}, "rows": {}, "failed": {}, "stat": {}}  # fmt: skip

    def read_index(self) -> dict[str, Any]:
        """The index as written last; an unreadable or foreign one counts as empty."""
        p = self.dir / INDEX
        try:
            ix = json.loads(p.read_text())
        except FileNotFoundError:
            return self.empty_index()
        except (OSError, ValueError) as e:
            log.warning("decoded store %s: index unreadable (%s); decoding again", self.dir, e)
            return self.empty_index()
        if ix.get("format") != FORMAT or ix.get("shape") != list(self.shape):
            return self.empty_index()
        return ix

    def write_index(self, ix: dict[str, Any]) -> None:
        atomic_write_bytes(self.dir / INDEX, json.dumps(ix, separators=(",", ":")).encode())

    def shard_problem(self, sid: str, rec: dict[str, Any], full: bool = False) -> str:
        """Why shard ``sid`` cannot be read as data, or "" when it is sound."""
        p = self.shard_path(sid)
        want = HEADER_BYTES + rec["rows"] * self.row_bytes
        try:
            size = p.stat().st_size
        except OSError:
            return "missing"
        if size != want or rec.get("bytes") != want:
            return f"{size} bytes, expected {want}"
        try:
            mm = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            return f"unreadable header ({e})"
        if mm.dtype != np.uint8 or mm.shape != (rec["rows"], *self.shape):
            return f"header says {mm.dtype} {mm.shape}"
        if full and _file_hash(p) != rec.get("blake2b"):
            return "checksum mismatch"
        return ""

    def check(self, ix: dict[str, Any], full: bool = False) -> list[str]:
        """Drop damaged shards (and the rows in them) from ``ix``; returns what was wrong."""
        bad = []
        for sid, rec in list(ix["shards"].items()):
            why = self.shard_problem(sid, rec, full)
            if not why:
                continue
            bad.append(f"{self.shard_path(sid).name}: {why}")
            del ix["shards"][sid]
            ix["rows"] = {k: v for k, v in ix["rows"].items() if str(v[0]) != sid}
            with contextlib.suppress(OSError):
                self.shard_path(sid).unlink()
        for b in bad:
            log.warning("decoded store %s: %s; its images are decoded again", self.dir, b)
        return bad

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        """The checked index under an exclusive lock (one writer per store; readers need none)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                ix = self.read_index()
                changed = bool(self.check(ix))
                # Under the lock no other writer exists: temporaries and unlisted shards are left-overs.
                listed = {self.shard_path(s).name for s in ix["shards"]}
                for p in self.dir.iterdir():
                    if p.name.endswith(".tmp") or (p.name.startswith("shard-") and p.name not in listed):
                        with contextlib.suppress(OSError):
                            p.unlink()
                if changed:
                    self.write_index(ix)
                yield ix
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading

    def array(self, ix: dict[str, Any], keys: Sequence[str]) -> StoreArray:
        """A read-only array of the rows stored under ``keys`` (all must be present)."""
        sids = sorted(int(s) for s in ix["shards"])
        pos = {s: i for i, s in enumerate(sids)}
        shard_of = np.empty(len(keys), dtype=np.int32)
        row_of = np.empty(len(keys), dtype=np.int64)
        for j, k in enumerate(keys):
            sid, row = ix["rows"][k]
            shard_of[j], row_of[j] = pos[int(sid)], row
        files = [self.shard_path(s) for s in sids]
        counts = [ix["shards"][str(s)]["rows"] for s in sids]
        return StoreArray(files, counts, self.shape, shard_of, row_of)


class _ShardWriter:
    """Appends rows to a temporary shard; a full (or closed) shard is renamed and indexed."""

    def __init__(self, store: DecodedStore, ix: dict[str, Any]) -> None:
        self.store, self.ix = store, ix
        self.f: Any = None
        self.pending: dict[str, int] = {}  # key -> row in the open shard
        self.added = 0

    def add(self, key: str, arr: np.ndarray) -> None:
        if key in self.ix["rows"] or key in self.pending:
            return  # the same content twice (a copied file): one row serves both
        if arr.shape != self.store.shape or arr.dtype != np.uint8:
            raise DataError(
                f"decoded store: row of {arr.dtype} {arr.shape}, expected uint8 {self.store.shape}"
            )
        if self.f is None:
            self.sid = self.ix["next_shard"]
            self.ix["next_shard"] += 1
            fd, self.tmp = tempfile.mkstemp(dir=self.store.dir, prefix=".shard-", suffix=".tmp")
            self.f = os.fdopen(fd, "wb")
            self.f.write(_npy_header((self.store.rows_per_shard, *self.store.shape)))
            self.h = hashlib.blake2b(digest_size=16)
        data = np.ascontiguousarray(arr).data
        self.f.write(data)
        self.h.update(data)
        self.pending[key] = len(self.pending)
        self.added += 1
        if len(self.pending) >= self.store.rows_per_shard:
            self.close()

    def close(self) -> None:
        """Finish the open shard: real row count in the header, fsync, rename, then the index."""
        if self.f is None:
            return
        n = len(self.pending)
        self.f.seek(0)
        self.f.write(_npy_header((n, *self.store.shape)))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        path = self.store.shard_path(self.sid)
        os.replace(self.tmp, path)
        size = HEADER_BYTES + n * self.store.row_bytes
        self.ix["shards"][str(self.sid)] = {"rows": n, "bytes": size, "blake2b": self.h.hexdigest()}
        for k, r in self.pending.items():
            self.ix["rows"][k] = [self.sid, r]
        self.pending = {}
        self.store.write_index(self.ix)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


class StoreArray:
    """Read-only (N, H, W, C) uint8 rows spread over memory-mapped shards.

    Indexing with an int, a slice, or an index array (numpy, list or torch tensor) returns a
    numpy copy of just those rows; pages stay in the page cache, not in the process's memory.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(
        self,
        files: list[Path],
        counts: list[int],
        shape: tuple[int, int, int],
        shard_of: np.ndarray,
        row_of: np.ndarray,
        readers_lock: Any = None,
    ) -> None:
        self.files, self.counts = files, counts
        self.row_shape = tuple(shape)
        self.shard_of, self.row_of = shard_of, row_of
        self._maps: dict[int, np.ndarray] = {}
        # Views share their parent's lock; the flock goes when the last of them is collected.
        self._readers = readers_lock if readers_lock is not None else _hold_readers(files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.row_of), *self.row_shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return len(self.row_of) * int(np.prod(self.row_shape))

    def __len__(self) -> int:
        return len(self.row_of)

    def __repr__(self) -> str:
        return f"StoreArray(shape={self.shape}, shards={len(self.files)})"

    def _map(self, i: int) -> np.ndarray:
        mm = self._maps.get(i)
        if mm is None:
            try:
                mm = np.load(self.files[i], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(
                    f"decoded store: cannot read {self.files[i]} ({e}); run again to rebuild it"
                ) from e
            if mm.shape != (self.counts[i], *self.row_shape):
                raise DataError(f"decoded store: {self.files[i]} changed on disk; run again to rebuild it")
            self._maps[i] = mm
        return mm

    def _indices(self, key: Any) -> np.ndarray:
        if hasattr(key, "numpy"):  # a torch tensor
            key = key.cpu().numpy()
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"StoreArray index must be int, slice or integer array, not {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} rows")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, int | np.integer):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            return np.array(self._map(int(self.shard_of[i]))[self.row_of[i]])
        if isinstance(key, slice):
            key = np.arange(len(self))[key]
        return self.take(self._indices(key))

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as one uint8 array, read shard by shard in file order."""
        out = np.empty((len(idx), *self.row_shape), dtype=np.uint8)
        if not len(idx):
            return out
        shards, rows = self.shard_of[idx], self.row_of[idx]
        for s in np.unique(shards):
            at = np.flatnonzero(shards == s)
            r = rows[at]
            order = np.argsort(r, kind="stable")  # ascending offsets: sequential reads where rows are near
            mm = self._map(int(s))
            r_sorted = r[order]
            lo, hi = int(r_sorted[0]), int(r_sorted[-1]) + 1
            if hi - lo == len(r_sorted) and (np.diff(r_sorted) == 1).all():
                out[at[order]] = mm[lo:hi]  # a contiguous run (evaluation in order): one slice
            else:
                out[at[order]] = mm[r_sorted]
        return out

    def subset(self, idx: np.ndarray) -> StoreArray:
        """A view of rows ``idx`` without reading them."""
        idx = self._indices(idx)
        return StoreArray(
            self.files, self.counts, self.row_shape, self.shard_of[idx], self.row_of[idx], self._readers
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.take(np.arange(len(self)))
        return a if dtype is None else a.astype(dtype)

    def drop_page_cache(self) -> None:
        """Drop this array's shards from the page cache so the next read comes from disk."""
        for f in self.files:
            _drop_from_page_cache(f)


def _hold_readers(files: list[Path]) -> Any:
    """An open file holding a shared flock on the store's readers file (None for no shards or a
    read-only store, which nothing can compact or clear either)."""
    if not files:
        return None
    try:
        f = open(files[0].parent / READERS, "a+b")  # noqa: SIM115 (held for the array's lifetime)
    except OSError:
        return None
    fcntl.flock(f, fcntl.LOCK_SH)
    return f


@contextlib.contextmanager
def _no_readers(d: Path) -> Iterator[None]:
    """Exclusive hold of store ``d``'s readers file; :class:`DataError` while a run reads the store."""
    try:
        f = open(d / READERS, "a+b")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise DataError(f"decoded store {d}: cannot open {READERS} ({e}); is the cache writable?") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"decoded store {d}: a running process is reading it (a training run streaming from "
                "it); try again when it has finished"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- building


def _array_key(a: np.ndarray) -> str:
    # Built-in sources have no files: the pixels (with their shape) are the content.
    return D.content_hash(str(a.shape).encode() + np.ascontiguousarray(a).tobytes())


# (content hash or None, decoded image or None, error or "", [size, mtime_ns, hash] to remember or None)
_Decoded1 = tuple[str | None, np.ndarray | None, str, list[Any] | None]


def _hash_and_decode(
    i: int, *, index: D.SourceIndex, pre: Preprocess, max_pixels: int, ix: dict[str, Any]
) -> _Decoded1:
    """Item ``i``'s content hash and, when the store lacks it, its decoded image.

    Runs in a pool thread: reads the index ``ix``, never writes it (the main thread does)."""
    rows, bad, stat = ix["rows"], ix["failed"], ix["stat"]
    path = index.items[i]
    st = None
    try:
        if index.reader is not None:  # tar members: no file to stat, read by byte range
            blob = index.reader(path)
        else:
            st = os.stat(path)
            # Same size and mtime as when hashed: trust the hash, skip reading the file.
            known = stat.get(path)
            if known and known[0] == st.st_size and known[1] == st.st_mtime_ns:
                k = known[2]
                if k in rows or k in bad:
                    return k, None, bad.get(k, ""), None
            blob = Path(path).read_bytes()
    except OSError as e:
        return None, None, f"cannot read file ({e})", None
    k = D.content_hash(blob)
    seen = [st.st_size, st.st_mtime_ns, k] if st is not None else None
    if k in rows or k in bad:
        return k, None, bad.get(k, ""), seen
    try:
        return k, load_uint8(blob, pre, max_pixels=max_pixels, name=path), "", seen
    except ImageDecodeError as e:
        return k, None, e.reason + (f" ({e.detail})" if e.detail else ""), seen


def build_store(
    index: D.SourceIndex,
    idx: np.ndarray,
    pre: Preprocess,
    *,
    cache_dir: str | None = None,
    workers: int = 2,
    max_pixels: int | None = None,
    progress: bool = True,
    desc: str = "store",
    shard_mb: float = DEFAULT_SHARD_MB,
) -> D.Decoded:
    """Like :func:`decode_items`, but the images stay on disk: ``Decoded.images`` is a :class:`StoreArray`.

    Only images the store lacks are decoded; unreadable ones are reported in ``failed`` (and
    remembered, so a later run does not decode them again).
    """
    from tqdm import tqdm

    idx = np.asarray(idx, dtype=np.int64)
    store = DecodedStore(store_root(cache_dir), pre, shard_mb)
    mp = max_pixels if max_pixels is not None else 100_000_000
    keys: list[str | None] = [None] * len(idx)
    failed: list[tuple[str, str]] = []
    t0 = time.time()
    with store.locked() as ix:
        writer = _ShardWriter(store, ix)
        rows, bad, stat = ix["rows"], ix["failed"], ix["stat"]
        try:
            bar = tqdm(total=len(idx), desc=desc, disable=not progress, leave=False)
            if index.arrays is not None:
                for s in range(0, len(idx), CHUNK):
                    part = idx[s : s + CHUNK]
                    ks = [_array_key(index.arrays[i]) for i in part]
                    todo = [j for j, k in enumerate(ks) if k not in rows and k not in writer.pending]
                    if todo:
                        # decode_items holds the resize rules for arrays; no cache: the store is one.
                        dec = D.decode_items(index, part[todo], pre, use_cache=False, progress=False)
                        for j, a in zip(todo, dec.images):
                            writer.add(ks[j], a)
                    keys[s : s + len(part)] = ks
                    bar.update(len(part))
            else:
                work = partial(_hash_and_decode, index=index, pre=pre, max_pixels=mp, ix=ix)
                with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
                    for s in range(0, len(idx), CHUNK):
                        part = idx[s : s + CHUNK]
                        for j, (k, arr, err, seen) in enumerate(ex.map(work, part), start=s):
                            if seen is not None:
                                was = stat.get(index.items[idx[j]])
                                if was and was[2] != seen[2]:  # changed: its old row is for compact
                                    ix.setdefault("replaced", []).append(was[2])
                                stat[index.items[idx[j]]] = seen
                            if err:
                                failed.append((index.items[idx[j]], err))
                                if k is not None:
                                    bad[k] = err
                                continue
                            if arr is not None:
                                writer.add(k, arr)  # type: ignore[arg-type]
                            keys[j] = k
                        bar.update(len(part))
            bar.close()
            writer.close()
            store.write_index(ix)  # new file hashes and failures, also when no row was added
            keep = [j for j, k in enumerate(keys) if k is not None]
            arr = store.array(ix, [keys[j] for j in keep])  # type: ignore[misc]
        except BaseException:
            writer.abort()
            raise
    if writer.added:
        log.info(
            "decoded store: %d new image(s) in %.1fs into %s",
            writer.added,
            time.time() - t0,
            store.dir,
        )
    kept = idx[keep]
    items = [index.items[i] for i in kept]
    return D.Decoded(arr, index.labels[kept], items, failed, index.targets_at(kept))  # type: ignore[arg-type]


def store_arrays(
    keys: Sequence[str],
    images: Any,
    pre: Preprocess,
    *,
    cache_dir: str | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
) -> StoreArray:
    """Write decoded uint8 rows (an iterable of HxWxC arrays aligned with ``keys``) into the store."""
    store = DecodedStore(store_root(cache_dir), pre, shard_mb)
    with store.locked() as ix:
        writer = _ShardWriter(store, ix)
        try:
            for k, a in zip(keys, images):
                writer.add(k, a)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return store.array(ix, list(keys))


# --------------------------------------------------------------------------- planning


@dataclass
class StoragePlan:
    """Where the decoded images live for a run, and why."""

    stream: bool
    decoded_mb: float
    budget_mb: float
    reason: str


def plan_storage(
    n_images: int, pre: Preprocess, stream: str, budget_mb: float, workers: int = 1
) -> StoragePlan:
    """In memory when the decoded images fit ``budget_mb`` (``stream: auto``), else from the store.

    With ``workers`` > 1 (Ray data-parallel ranks) ``auto`` always streams: each rank reads only
    its own rows of the one shared store instead of holding a full copy of the data set.
    """
    mb = n_images * int(np.prod((*pre.size, pre.channels))) / 2**20
    if stream == "on":
        return StoragePlan(True, mb, budget_mb, "stream: on")
    if stream == "off":
        return StoragePlan(False, mb, budget_mb, "stream: off")
    if workers > 1:
        why = f"{workers} workers share the store, each reads only its rows; {mb:.0f} MB decoded"
        return StoragePlan(True, mb, budget_mb, why)
    fits = mb <= budget_mb
    why = f"{mb:.0f} MB decoded {'fits' if fits else 'exceeds'} memory_budget_mb {budget_mb:g}"
    return StoragePlan(not fits, mb, budget_mb, why)


# --------------------------------------------------------------------------- reporting


def _tree_bytes(p: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def store_info(cache_dir: str | None = None, verify: bool = False) -> dict[str, Any]:
    """Location and disk use of the cache: each store (shards, images, bytes, problems) and the rest."""
    root = D.cache_root(cache_dir)
    stores = []
    for d in _store_dirs(store_root(cache_dir), None):
        try:
            ix = json.loads((d / INDEX).read_text())
            st = _store_at(d, ix["shape"])
        except (OSError, ValueError, KeyError, TypeError):
            stores.append({"key": d.name, "path": str(d), "bytes": _tree_bytes(d), "problems": ["no index"]})
            continue
        problems = [
            f"{st.shard_path(s).name}: {why}"
            for s, rec in ix["shards"].items()
            if (why := st.shard_problem(s, rec, full=verify))
        ]
        stored = sum(r["rows"] for r in ix["shards"].values())
        stores.append(
            {
                "key": d.name,
                "path": str(d),
                "shards": len(ix["shards"]),
                "images": len(ix["rows"]),
                "unreferenced_rows": stored - len(ix["rows"]),
                "failed": len(ix["failed"]),
                "bytes": _tree_bytes(d),
                "problems": problems,
            }
        )
    other = {}
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and p.name != "store":
                other[p.name] = _tree_bytes(p)
    return {"path": str(root), "stores": stores, "other": other, "verified": verify}


def _store_dirs(sroot: Path, key: str | None) -> list[Path]:
    if key:
        return [sroot / key]
    return sorted(p for p in sroot.iterdir() if p.is_dir()) if sroot.is_dir() else []


def _store_at(d: Path, shape: list[int], shard_mb: float = DEFAULT_SHARD_MB) -> DecodedStore:
    """The store in folder ``d`` whose index gives ``shape`` (its resize rule from the folder's name)."""
    h, w, c = shape
    st = DecodedStore(d.parent, Preprocess((h, w), c, resize=d.name.split("-", 1)[-1]), shard_mb)
    st.dir = d
    return st


def _stores(cache_dir: str | None, key: str | None, shard_mb: float = DEFAULT_SHARD_MB) -> list[DecodedStore]:
    """The stores with a readable index (all, or the one ``key``)."""
    out = []
    for d in _store_dirs(store_root(cache_dir), key):
        try:
            out.append(_store_at(d, json.loads((d / INDEX).read_text())["shape"], shard_mb))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def compact_store(
    cache_dir: str | None = None, key: str | None = None, shard_mb: float = DEFAULT_SHARD_MB
) -> list[dict[str, Any]]:
    """Rewrite each store (or the one ``key``) without the rows no current file needs, in full shards.

    A row goes when every file it was decoded from has been removed or changed since (its size or
    mtime no longer match what the store remembers); rows that came from no file (built-in sets,
    tar members) stay. Shards holding such rows, or less than half full, are rewritten under new
    names, then the old ones are deleted: a crash midway leaves a sound store. Raises
    :class:`DataError` while a run reads the store. Returns one summary per store.
    """
    out = []
    for st in _stores(cache_dir, key, shard_mb):
        # The writers' lock first, as build_store takes them (it holds .lock while it opens a
        # StoreArray, which waits for .readers): the other order could deadlock with it.
        with st.locked() as ix, _no_readers(st.dir):
            before = {
                "shards": len(ix["shards"]),
                "rows": sum(r["rows"] for r in ix["shards"].values()),
                "bytes": _tree_bytes(st.dir),
            }
            stale = _forget_changed_files(ix)
            redo = _shards_to_rewrite(st, ix)
            _rewrite(st, ix, redo)
            out.append(
                {
                    "key": st.dir.name,
                    "path": str(st.dir),
                    "changed_or_removed_files": stale,
                    "shards": [before["shards"], len(ix["shards"])],
                    "rows": [before["rows"], sum(r["rows"] for r in ix["shards"].values())],
                    "bytes": [before["bytes"], _tree_bytes(st.dir)],
                }
            )
    return out


def _forget_changed_files(ix: dict[str, Any]) -> int:
    """Drop remembered files that are gone or changed, and rows (and failures) only they used;
    returns how many files that was (``replaced``: contents of files that changed since)."""
    replaced = ix.pop("replaced", [])
    live, stale, n = set(), set(replaced), len(replaced)
    for path, (size, mtime, h) in list(ix["stat"].items()):
        try:
            st = os.stat(path)
            ok = st.st_size == size and st.st_mtime_ns == mtime
        except OSError:
            ok = False
        if ok:
            live.add(h)
        else:
            stale.add(h)
            del ix["stat"][path]
            n += 1
    for h in stale - live:
        ix["rows"].pop(h, None)
        ix["failed"].pop(h, None)
    return n


def _shards_to_rewrite(st: DecodedStore, ix: dict[str, Any]) -> list[str]:
    used = Counter(str(sid) for sid, _ in ix["rows"].values())
    holes = [s for s, rec in ix["shards"].items() if used.get(s, 0) < rec["rows"]]
    small = [s for s, rec in ix["shards"].items() if rec["rows"] < st.rows_per_shard // 2 and s not in holes]
    # One small shard alone gains nothing from a copy; two or more merge.
    return sorted(holes + (small if len(small) + len(holes) > 1 else []), key=int)


def _rewrite(st: DecodedStore, ix: dict[str, Any], redo: list[str]) -> None:
    """Copy the referenced rows of shards ``redo`` into new shards, then delete ``redo``."""
    if not redo:
        return
    rows_in: dict[str, list[tuple[int, str]]] = {s: [] for s in redo}
    for k, (sid, row) in ix["rows"].items():
        if str(sid) in rows_in:
            rows_in[str(sid)].append((row, k))
    writer = _ShardWriter(st, ix)
    try:
        for sid in redo:
            mm = np.load(st.shard_path(sid), mmap_mode="r", allow_pickle=False)
            for row, k in sorted(rows_in[sid]):
                del ix["rows"][k]  # re-added by the writer, which skips keys it already holds
                writer.add(k, np.asarray(mm[row]))
            del mm
        writer.close()
    except BaseException:
        writer.abort()
        raise
    for sid in redo:
        del ix["shards"][sid]
    st.write_index(ix)
    for sid in redo:
        with contextlib.suppress(OSError):
            st.shard_path(sid).unlink()


def clear_store(cache_dir: str | None = None, key: str | None = None, per_image: bool = True) -> int:
    """Delete the decoded store (one ``key`` or all) and the per-image decode cache; returns bytes freed.

    Raises :class:`DataError` (deleting nothing) while a run reads one of those stores."""
    root = D.cache_root(cache_dir)
    sroot = store_root(cache_dir)
    targets = [sroot / key] if key else [sroot]
    if per_image and not key:
        targets.append(root / "decoded")
    dirs = _store_dirs(sroot, key)
    freed = 0
    with contextlib.ExitStack() as hold:
        for d in dirs:
            if d.is_dir():
                hold.enter_context(_no_readers(d))
        for t in targets:
            if t.is_dir():
                freed += _tree_bytes(t)
                shutil.rmtree(t)
    return freed
