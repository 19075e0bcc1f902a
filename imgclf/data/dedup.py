"""Duplicate and near-duplicate groups by content hash and 256-bit perceptual hash.

:func:`scan` reads every item once (content hash, header probe, a real decode through
:func:`imgclf.core.imageio.open_image`, a perceptual hash); :func:`find_groups` groups exact and
near copies; :func:`dedup_for_training` is the fast path training runs before splitting, and
the dataset doctor (:mod:`imgclf.analysis.doctor`) reports on the same scan.

Near-duplicates: the DCT perceptual hash of ``imagehash.phash`` with ``hash_size=16``
(256 bits). Two images are near-duplicates when their hashes differ in at most
:data:`NEAR_THRESHOLD` bits. Measured on sign-language-digits (2,062 photos of hands on
similar backgrounds): copies resized by 0.5-1.3x and re-encoded as JPEG at quality 60-90
differ by at most 16 bits, while the closest pair of distinct photos differs by 42.
The 64-bit hash (``hash_size=8``) was not usable there: distinct photos came within 2 bits.

At scale: comparing every pair of hashes is quadratic (5x10^11 comparisons at a million images),
so above :data:`INDEX_MIN_ITEMS` hashes :func:`find_near_pairs` asks a faiss binary inverted-file
index (``IndexBinaryIVF``, about sqrt(n) lists, :data:`IVF_NPROBE` probed, range search on the
Hamming distance) instead, and falls back to the exact all-pairs :func:`near_pairs` when faiss
cannot be imported. Measured on Fashion-MNIST + MNIST hashes (``bench/scale_doctor.py``): the
index finds every pair exact search finds at 10k-70k images; faiss' multi-hash index was slower
than brute force (the low-frequency phash bits are far from uniform, so its buckets are crowded)
and its HNSW index was 3x slower than the inverted file at the same recall.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgclf.core.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, open_formats, open_image
from imgclf.data import sources as D

log = logging.getLogger("imgclf")


HASH_SIZE = 16  # phash side: 16x16 = 256 bits


NEAR_THRESHOLD = 22  # max differing bits (of 256) for a near-duplicate; see the module docstring

# Below this many hashes exact all-pairs is as fast as building an index: bench/scale_doctor.py
# measured exact 0.14-0.18 / index 0.19-0.20 s at 2,000 hashes, 0.26-0.36 / 0.30-0.32 s at 3,000
# (two runs), 1.5-2.2 / 0.4-0.6 s at 8,000.
INDEX_MIN_ITEMS = 3000

IVF_NPROBE = 16  # inverted lists visited per query; 8 already missed 2 of 627 pairs at 140k
IVF_TRAIN_PER_LIST = 40  # k-means sample: this many hashes per list (faiss' own minimum is 39)
SCAN_CHUNK = 4096  # items in flight while scanning: bounds memory whatever the source size


# Which decoder formats each extension may honestly hold.
EXT_FORMATS: dict[str, set[str]] = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".jpe": {"JPEG", "MPO"},
    ".jfif": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".gif": {"GIF"},
    ".bmp": {"BMP", "DIB"},
    ".dib": {"BMP", "DIB"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
    ".webp": {"WEBP"},
    ".ppm": {"PPM"},
    ".pgm": {"PPM"},
    ".pbm": {"PPM"},
    ".pnm": {"PPM"},
    ".ico": {"ICO"},
    ".tga": {"TGA"},
}


@dataclass(slots=True)  # slots: a million of these must stay small
class ItemInfo:
    """What one read of an item found."""

    index: int
    nbytes: int = 0
    digest: str = ""  # content hash of the file bytes (or the pixel array for built-ins)
    format: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    error: str = ""  # ImageDecodeError reason; "" when the image decoded
    detail: str = ""
    phash: np.ndarray | None = None  # packed bits, uint8 (HASH_SIZE**2 // 8,)

    @property
    def ok(self) -> bool:
        return not self.error


def _phash(img: Image.Image) -> np.ndarray:
    import imagehash

    return np.packbits(imagehash.phash(img, hash_size=HASH_SIZE).hash.ravel())


def _scan_file(
    i: int, path: str, near: bool, max_pixels: int | None, reader: Callable[[str], bytes] | None = None
) -> ItemInfo:
    info = ItemInfo(i)
    try:
        blob = reader(path) if reader else Path(path).read_bytes()
    except OSError as e:
        info.error, info.detail = "cannot read file", str(e)
        return info
    info.nbytes = len(blob)
    info.digest = D.content_hash(blob)
    src: bytes | Image.Image = blob
    try:
        # Parse the header once: its format/mode/size go in the report, then open_image decodes it.
        src = Image.open(io.BytesIO(blob), formats=open_formats())
        info.format, info.mode, (info.width, info.height) = src.format, src.mode, src.size
    except Exception:  # noqa: BLE001 - open_image(blob) below says why, as a typed error
        src = blob
    try:
        # The size hint lets big JPEGs decode at 1/2..1/8 scale; phash only needs 64x64.
        img = open_image(src, channels=3, size=(64, 64), max_pixels=max_pixels, name=path)
    except ImageDecodeError as e:
        info.error, info.detail = e.reason, e.detail
        return info
    if near:
        info.phash = _phash(img)
    return info


def _scan_array(i: int, arr: np.ndarray, near: bool) -> ItemInfo:
    info = ItemInfo(i, nbytes=arr.nbytes, digest=D.content_hash(np.ascontiguousarray(arr).tobytes()))
    info.format, info.mode = "array", "L" if arr.ndim == 2 else "RGB"
    info.height, info.width = int(arr.shape[0]), int(arr.shape[1])
    if near:
        info.phash = _phash(Image.fromarray(arr))
    return info


def scan(
    index: D.SourceIndex,
    *,
    near: bool = True,
    workers: int = 2,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> list[ItemInfo]:
    """Read every item of ``index`` once: hash, header, decode check and (``near``) perceptual hash."""
    from tqdm import tqdm

    n = len(index)
    if index.arrays is not None:
        arrays = index.arrays

        def work(i: int) -> ItemInfo:
            return _scan_array(i, arrays[i], near)
    else:
        items, reader = index.items, index.reader

        def work(i: int) -> ItemInfo:
            return _scan_file(i, items[i], near, max_pixels, reader)

    # Threads: PIL and hashlib release the GIL while decoding and hashing. Executor.map submits
    # every task at once, so chunks keep the number of pending futures (and their bytes) bounded.
    out: list[ItemInfo] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as ex,
        tqdm(total=n, desc="inspect", unit="img", disable=not progress, leave=False) as bar,
    ):
        for s in range(0, n, SCAN_CHUNK):
            for info in ex.map(work, range(s, min(n, s + SCAN_CHUNK))):
                out.append(info)
                bar.update(1)
    return out


def near_pairs(
    hashes: np.ndarray, threshold: int = NEAR_THRESHOLD, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of packed bit rows within ``threshold`` differing bits, and their distances."""
    from tqdm import tqdm

    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    # uint64 words make the XOR + popcount cheap; pad rows to a multiple of 8 bytes.
    width = -(-hashes.shape[1] // 8) * 8
    h = np.zeros((n, width), dtype=np.uint8)
    h[:, : hashes.shape[1]] = hashes
    words = h.view(np.uint64)
    # Blocks of rows against all later rows keep the temporary near 64 MB.
    block = max(1, min(n, (64 << 20) // (8 * words.shape[1] * n)))
    pairs, dists = [], []
    starts = range(0, n, block)
    for s in tqdm(starts, desc="near-duplicates", disable=not progress or n < 5000, leave=False):
        e = min(n, s + block)
        d = np.zeros((e - s, n - s), dtype=np.int32)
        for k in range(words.shape[1]):
            d += np.bitwise_count(words[s:e, k, None] ^ words[None, s:, k])
        r, c = np.nonzero(d <= threshold)
        keep = (c + s) > (r + s)
        pairs.append(np.stack([r[keep] + s, c[keep] + s], axis=1))
        dists.append(d[r[keep], c[keep]])
    return np.concatenate(pairs).astype(np.int64), np.concatenate(dists).astype(np.int64)


def _faiss() -> Any | None:
    """The faiss module, or None when it cannot be imported (the exact search is used then)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def choose_method(n: int) -> str:
    """``"index"`` for ``n`` >= :data:`INDEX_MIN_ITEMS` hashes when faiss imports, else ``"exact"``."""
    return "index" if n >= INDEX_MIN_ITEMS and _faiss() is not None else "exact"


def near_pairs_indexed(
    hashes: np.ndarray,
    threshold: int = NEAR_THRESHOLD,
    progress: bool = False,
    *,
    nprobe: int = IVF_NPROBE,
    seed: int = 0,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs within ``threshold`` bits via a faiss binary inverted-file index, as :func:`near_pairs` gives.

    Approximate: a pair whose hashes fall in lists more than ``nprobe`` apart is missed.
    ``threads``: faiss' OpenMP threads for this call. One by default: on a busy 2-core machine two
    spin-waiting OpenMP threads made it 3-10x slower, and hashing (the scan) costs 5-10x more anyway.
    """
    faiss = _faiss()
    if faiss is None:
        raise ImportError("faiss is not installed")
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads))
    try:
        return _ivf_pairs(
            faiss, np.ascontiguousarray(hashes, dtype=np.uint8), threshold, progress, nprobe, seed
        )
    finally:
        faiss.omp_set_num_threads(before)


def _ivf_pairs(
    faiss: Any, h: np.ndarray, threshold: int, progress: bool, nprobe: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    n = len(h)
    d_bits = h.shape[1] * 8
    nlist = max(1, min(int(np.sqrt(n)), n // 39))  # 39 a list: faiss warns below that
    ix = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d_bits), d_bits, nlist)
    ix.cp.niter = 10  # k-means on 40 points a list converges long before faiss' default 25 rounds
    ix.cp.seed = seed
    ix.cp.verbose = False
    rng = np.random.default_rng(seed)
    sample = h[np.sort(rng.choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))]
    ix.train(sample)
    ix.add(h)
    ix.nprobe = min(nprobe, nlist)
    qs, js, ds = [], [], []
    block = 16384  # queries a call: keeps the result buffers small and drives the progress bar
    for s in tqdm(range(0, n, block), desc="near-duplicates", disable=not progress, leave=False):
        lims, dist, ids = ix.range_search(h[s : s + block], threshold + 1)  # radius is exclusive
        counts = np.diff(lims.astype(np.int64))
        qs.append(np.repeat(np.arange(s, s + len(counts), dtype=np.int64), counts))
        js.append(ids.astype(np.int64))
        ds.append(dist.astype(np.int64))
    q, j, d = np.concatenate(qs), np.concatenate(js), np.concatenate(ds)
    # Each pair may come back from either end (or both): keep it once, as (low, high).
    keep = (j >= 0) & (j != q)
    a, b, d = np.minimum(q, j)[keep], np.maximum(q, j)[keep], d[keep]
    key, first = np.unique(a * n + b, return_index=True)
    pairs = np.stack([key // n, key % n], axis=1)
    return pairs.astype(np.int64), d[first]


def find_near_pairs(
    hashes: np.ndarray, threshold: int = NEAR_THRESHOLD, progress: bool = False, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Near pairs by ``method``: ``"exact"`` (all pairs), ``"index"`` (faiss) or ``"auto"``
    (:func:`choose_method`); ``"index"`` without faiss is exact."""
    if method == "auto":
        method = choose_method(len(hashes))
    if method == "index" and _faiss() is not None:
        return near_pairs_indexed(hashes, threshold, progress)
    return near_pairs(hashes, threshold, progress)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component id per node of the graph given by ``pairs``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n)
    g = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1]


@dataclass
class Groups:
    """Duplicate structure over the readable items of a scan."""

    component: np.ndarray  # per item: group id (exact + near merged); unreadable items are singletons
    exact: list[list[int]]  # byte-identical groups (>= 2 items)
    merged: list[list[int]]  # every group (>= 2 items) after merging exact and near pairs
    near: list[list[int]]  # merged groups that are not just one exact group
    max_dist: dict[int, int]  # component id -> largest phash distance of its near pairs


def find_groups(
    infos: list[ItemInfo],
    *,
    near: bool = True,
    threshold: int = NEAR_THRESHOLD,
    progress: bool = False,
    method: str = "auto",
) -> Groups:
    """Exact groups by content hash, near groups by perceptual hash (``method``: see
    :func:`find_near_pairs`), merged transitively."""
    n = len(infos)
    by_digest: dict[str, list[int]] = {}
    for inf in infos:
        if inf.ok:
            by_digest.setdefault(inf.digest, []).append(inf.index)
    exact = [g for g in by_digest.values() if len(g) > 1]
    pair_list = [np.asarray([[g[0], j] for j in g[1:]], dtype=np.int64) for g in exact]
    near_p = np.zeros((0, 2), dtype=np.int64)
    near_d = np.zeros(0, dtype=np.int64)
    with_hash = [inf.index for inf in infos if inf.ok and inf.phash is not None]
    if near and len(with_hash) > 1:
        ids = np.asarray(with_hash)
        hashes = np.stack([infos[i].phash for i in with_hash])
        p, d = find_near_pairs(hashes, threshold, progress, method)
        p = ids[p]
        same = np.asarray([infos[a].digest == infos[b].digest for a, b in p], dtype=bool)
        near_p, near_d = p[~same], d[~same]
        pair_list.append(near_p)
    pairs = np.concatenate(pair_list) if pair_list else np.zeros((0, 2), dtype=np.int64)
    comp = _components(n, pairs)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(comp):
        members.setdefault(int(c), []).append(i)
    merged = [m for m in members.values() if len(m) > 1]
    exact_sets = {tuple(sorted(g)) for g in exact}
    near_groups = [m for m in merged if tuple(m) not in exact_sets]
    max_dist: dict[int, int] = {}
    for (a, _), d in zip(near_p, near_d):
        c = int(comp[a])
        max_dist[c] = max(max_dist.get(c, 0), int(d))
    return Groups(comp, exact, merged, near_groups, max_dist)


def dedup_for_training(
    index: D.SourceIndex, cfg: Any, progress: bool
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Fast checks before splitting: (usable item indices, group id per usable item or None, report).

    Unreadable files are appended to ``index.skipped`` and left out; every image of a group
    whose members carry different labels (a label conflict) is left out; with
    ``cfg.dedup == 'keep-one'`` only the first member of each duplicate group is kept,
    with ``'group'`` the group ids keep each group on one side of the split.
    """
    t0 = time.perf_counter()
    infos = scan(index, near=True, workers=cfg.workers, max_pixels=cfg.max_pixels, progress=progress)
    groups = find_groups(infos, near=True, progress=progress)
    labels = index.labels
    bad = np.zeros(len(index), dtype=bool)
    for inf in infos:
        if not inf.ok:
            bad[inf.index] = True
            reason = inf.error + (f" ({inf.detail})" if inf.detail else "")
            index.skipped.append((index.items[inf.index], reason))
    comp = groups.component
    conflict_items: list[int] = []
    for g in groups.merged:
        if len({int(labels[i]) for i in g}) > 1:
            conflict_items.extend(g)
    bad[conflict_items] = True
    for i in sorted(conflict_items):
        index.skipped.append((index.items[i], "label conflict: the same image is filed under another class"))
    usable = np.flatnonzero(~bad)
    dropped_copies = 0
    if cfg.dedup == "keep-one":
        _, first = np.unique(comp[usable], return_index=True)
        dropped_copies = len(usable) - len(first)
        usable = usable[np.sort(first)]
        out_groups = None
    else:
        out_groups = comp[usable]
    report = {
        "scanned": len(index),
        "seconds": round(time.perf_counter() - t0, 3),
        "unreadable": int(sum(not i.ok for i in infos)),
        "exact_duplicate_groups": len(groups.exact),
        "near_duplicate_groups": len(groups.near),
        "images_in_duplicate_groups": int(sum(len(g) for g in groups.merged)),
        "label_conflict_images": len(set(conflict_items)),
        "dropped_copies": int(dropped_copies),
        "usable": len(usable),
        "dedup": cfg.dedup,
        "near_threshold": NEAR_THRESHOLD,
    }
    action = {
        "group": "each group kept on one side of the split",
        "keep-one": f"{dropped_copies} extra cop{'y' if dropped_copies == 1 else 'ies'} dropped",
    }.get(cfg.dedup, "")
    log.info(
        "data check (%.1fs): %d files, %d unreadable, %d exact + %d near duplicate groups (%d images; %s), "
        "%d label-conflict images left out",
        report["seconds"],
        report["scanned"],
        report["unreadable"],
        report["exact_duplicate_groups"],
        report["near_duplicate_groups"],
        report["images_in_duplicate_groups"],
        action,
        report["label_conflict_images"],
    )
    return usable, out_groups, report
