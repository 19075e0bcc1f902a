"""Near duplicates at scale: the faiss index finds what exact all-pairs finds; the fallback and cut-over."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from imgclf.data import dedup
from imgclf.data import sources as D

faiss = pytest.importorskip("faiss")


def _plant_copies(folder: Path, every: int = 3) -> int:
    """Next to every ``every``-th photo, a resized, brightened, JPEG-re-encoded copy (a near duplicate)."""
    planted = 0
    for k, f in enumerate(sorted(folder.rglob("*.JPG"))):
        if k % every:
            continue
        img = Image.open(f).convert("RGB")
        w, h = img.size
        img = img.resize((int(w * 0.8), int(h * 0.8)), Image.Resampling.BILINEAR)
        img = ImageEnhance.Brightness(img).enhance(1.05)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70)
        (f.parent / f"{f.stem}_copy.jpg").write_bytes(buf.getvalue())
        planted += 1
    return planted


@pytest.fixture(scope="module")
def planted_scan(tmp_path_factory: pytest.TempPathFactory, small_sign_folder) -> tuple[list, int]:
    root = small_sign_folder(tmp_path_factory.mktemp("planted"), per_class=40, classes=("0", "1", "2", "3"))
    planted = _plant_copies(root)
    infos = dedup.scan(D.index_source(str(root)), progress=False)
    return infos, planted


def test_index_finds_the_exact_pairs_on_real_photos(planted_scan: tuple[list, int]) -> None:
    infos, planted = planted_scan
    hashes = np.stack([i.phash for i in infos])
    exact_p, exact_d = dedup.near_pairs(hashes)
    index_p, index_d = dedup.near_pairs_indexed(hashes)
    assert len(exact_p) >= planted  # every planted copy is found by the reference itself
    assert {tuple(p): int(d) for p, d in zip(exact_p.tolist(), exact_d)} == {
        tuple(p): int(d) for p, d in zip(index_p.tolist(), index_d)
    }
    assert index_p.dtype == np.int64 and index_d.dtype == np.int64
    assert (index_p[:, 0] < index_p[:, 1]).all()


def test_index_on_the_whole_sign_dataset_matches_exact(sign_dir: Path) -> None:
    # 2,062 real photos: hashing them is the slow part, so hash at 64x64 through the scan once.
    infos = dedup.scan(D.index_source(str(sign_dir)), progress=False)
    hashes = np.stack([i.phash for i in infos if i.ok])
    exact_p, _ = dedup.near_pairs(hashes)
    index_p, _ = dedup.near_pairs_indexed(hashes)
    assert sorted(map(tuple, exact_p.tolist())) == sorted(map(tuple, index_p.tolist()))


def _group_sets(g: dedup.Groups) -> tuple[list, list, list, dict]:
    return (
        sorted(sorted(x) for x in g.exact),
        sorted(sorted(x) for x in g.merged),
        sorted(sorted(x) for x in g.near),
        sorted(g.max_dist.values()),
    )


def test_fallback_without_faiss_gives_identical_groups(
    planted_scan: tuple[list, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    infos, _ = planted_scan
    with_index = dedup.find_groups(infos, method="index")
    monkeypatch.setattr(dedup, "_faiss", lambda: None)
    assert dedup.choose_method(10**6) == "exact"
    without = dedup.find_groups(infos, method="index")  # asks for the index, gets the exact path
    auto = dedup.find_groups(infos)
    assert _group_sets(with_index) == _group_sets(without) == _group_sets(auto)
    assert with_index.near  # the planted copies are there


def test_cutover_picks_exact_for_small_sets() -> None:
    assert dedup.choose_method(10) == "exact"
    assert dedup.choose_method(dedup.INDEX_MIN_ITEMS - 1) == "exact"
    assert dedup.choose_method(dedup.INDEX_MIN_ITEMS) == "index"


def test_empty_and_tiny_inputs_keep_the_form() -> None:
    for n in (0, 1):
        p, d = dedup.near_pairs_indexed(np.zeros((n, 32), dtype=np.uint8))
        assert p.shape == (0, 2) and d.shape == (0,)
    p, d = dedup.near_pairs_indexed(np.zeros((3, 32), dtype=np.uint8))  # three identical hashes
    assert p.tolist() == [[0, 1], [0, 2], [1, 2]] and d.tolist() == [0, 0, 0]
