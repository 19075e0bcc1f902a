"""Data sources, decoding, cache and splits on real data."""

from __future__ import annotations

import gzip
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.core.imageio import ImageDecodeError, open_image
from imgclf.core.preprocess import Preprocess, load_uint8
from imgclf.data import sources as D


def test_sign_language_folder_counts_and_classes(sign_dir: Path) -> None:
    idx = D.index_source(str(sign_dir))
    assert idx.kind == "folder"
    assert idx.classes == [str(i) for i in range(10)]
    assert len(idx) == sum(1 for c in sign_dir.iterdir() for _ in c.iterdir())
    # labels follow the folder each file sits in
    for item, label in zip(idx.items[::97], idx.labels[::97]):
        assert Path(item).parent.name == idx.classes[label]


def test_presplit_layouts(tmp_path: Path, small_sign_folder) -> None:
    for train_name, test_name in (("train", "test"), ("training_set", "test_set")):
        root = tmp_path / train_name
        small_sign_folder(root / train_name, per_class=6)
        small_sign_folder(root / test_name, per_class=2)
        idx = D.index_folder(root)
        assert idx.has_predefined_split
        assert idx.classes == ["0", "1", "2"]
        assert (idx.split == "train").sum() == 18
        assert (idx.split == "test").sum() == 6


def test_empty_and_missing_folders_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="not a folder and not a built-in"):
        D.index_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no class folders"):
        D.index_source(str(tmp_path / "empty"))
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "cat" / "a.png")
    with pytest.raises(D.DataError, match="at least two"):
        D.index_source(str(tmp_path / "one"))


def test_content_not_extension_and_all_modes(sign_dir: Path, tmp_path: Path) -> None:
    src = Image.open(next((sign_dir / "3").iterdir())).convert("RGB")
    pre = Preprocess((32, 32), 3)
    variants = {
        "png_named.gif": ("PNG", src),
        "jpeg_named.png": ("JPEG", src),
        "grey.png": ("PNG", src.convert("L")),
        "palette.png": ("PNG", src.convert("P")),
        "alpha.png": ("PNG", src.convert("RGBA")),
        "cmyk.jpg": ("JPEG", src.convert("CMYK")),
        "sixteen.png": ("PNG", Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257)),
    }
    for name, (fmt, img) in variants.items():
        img.save(tmp_path / name, format=fmt)
        arr = load_uint8(tmp_path / name, pre)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, name
        assert arr.std() > 5, f"{name} decoded to a flat image"
    grey = load_uint8(tmp_path / "sixteen.png", Preprocess((32, 32), 1))
    assert grey.shape == (32, 32, 1)
    # 16-bit data is rescaled, not clipped to white
    assert grey.mean() < 250


def test_bad_files_raise_typed_error(tmp_path: Path, sign_dir: Path) -> None:
    good = next((sign_dir / "0").iterdir()).read_bytes()
    cases = {
        "empty.jpg": b"",
        "text.jpg": b"hello, not an image",
        "truncated.jpg": good[: len(good) // 2],
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ImageDecodeError) as e:
            open_image(tmp_path / name)
        assert name in str(e.value)


def test_idx_mnist_counts_and_checksum(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    idx = D.index_source("mnist")
    assert (idx.split == "train").sum() == 60000 and (idx.split == "test").sum() == 10000
    assert idx.arrays.shape == (70000, 28, 28)
    assert idx.classes == [str(i) for i in range(10)]
    # a damaged copy is refused by checksum, naming the file
    bad = tmp_path / "mnist"
    shutil.copytree(mnist_dir, bad)
    raw = bytearray(gzip.decompress((bad / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    monkeypatch.setenv("IMGCLF_DATA_DIR", str(tmp_path))
    with pytest.raises(D.DataError, match="checksum"):
        D.index_source("mnist")


def test_fashion_mnist_class_names(shared_dir: Path) -> None:
    idx = D.index_source("fashion-mnist")
    assert idx.classes[0] == "T-shirt/top" and idx.classes[-1] == "Ankle boot"
    assert len(idx) == 70000


def test_digits_is_offline_and_scaled() -> None:
    idx = D.index_source("digits")
    assert len(idx) == 1797 and idx.arrays.max() == 255


def test_split_is_stratified_seeded_and_disjoint() -> None:
    labels = D.index_source("digits").labels
    a = D.split_indices(labels, {"val": 0.2, "test": 0.1}, seed=1)
    b = D.split_indices(labels, {"val": 0.2, "test": 0.1}, seed=1)
    c = D.split_indices(labels, {"val": 0.2, "test": 0.1}, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    allidx = np.concatenate(list(a.values()))
    assert len(allidx) == len(labels) == len(np.unique(allidx))
    for k, frac in (("val", 0.2), ("test", 0.1)):
        per_class = np.bincount(labels[a[k]], minlength=10) / np.bincount(labels, minlength=10)
        assert np.all(np.abs(per_class - frac) < 0.02), (k, per_class)


def test_split_keeps_groups_together() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    groups = rng.integers(0, 60, size=200) + labels * 1000  # groups within a class
    parts = D.split_indices(labels, {"val": 0.25}, seed=3, groups=groups)
    tr, va = set(groups[parts["train"]]), set(groups[parts["val"]])
    assert tr.isdisjoint(va)
    assert 0.15 < len(parts["val"]) / 200 < 0.35


def test_decode_cache_serves_second_run(
    small_sign_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = small_sign_folder(tmp_path / "ds", per_class=5)
    idx = D.index_folder(root)
    pre = Preprocess((40, 40), 3)
    first = D.decode_items(idx, np.arange(len(idx)), pre, cache_dir=str(tmp_path / "c"), progress=False)
    assert not first.failed

    def boom(*a, **k):  # any decode now would fail the test
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(D, "load_uint8", boom)
    second = D.decode_items(idx, np.arange(len(idx)), pre, cache_dir=str(tmp_path / "c"), progress=False)
    assert np.array_equal(first.images, second.images)


def test_corrupt_file_is_reported_not_fatal(tmp_path: Path, small_sign_folder) -> None:
    root = small_sign_folder(tmp_path / "ds", per_class=4)
    (root / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    idx = D.index_folder(root)
    dec = D.decode_items(idx, np.arange(len(idx)), Preprocess((32, 32), 3), use_cache=False, progress=False)
    assert len(dec.labels) == 12
    assert len(dec.failed) == 1 and dec.failed[0][0].endswith("broken.jpg")


def test_jpeg_draft_decoding_of_big_photo_is_reduced(sign_dir: Path) -> None:
    big = [p for c in sign_dir.iterdir() for p in c.iterdir() if p.stat().st_size > 200_000]
    if not big:
        pytest.skip("no large photo in the dataset")
    img = open_image(big[0], size=(96, 96))
    # draft mode decodes at a DCT scale: far fewer pixels than the 3024x3024 original
    assert max(img.size) < 1000
    blob = io.BytesIO()
    img.save(blob, "PNG")
    assert blob.tell() > 0


def test_manifest_csv_and_parquet_single_label(tmp_path: Path, small_sign_folder: Path) -> None:
    """A path,label[,split] manifest indexes the same images and classes as the folder it lists."""
    import csv

    from imgclf.data.sources import index_source

    folder = index_source(str(small_sign_folder(tmp_path / "imgs")))
    rows = [
        (os.path.relpath(p, tmp_path), folder.classes[y], "test" if i % 5 == 0 else "")
        for i, (p, y) in enumerate(zip(folder.items, folder.labels))
    ]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    m = index_source(str(tmp_path / "m.csv"))
    assert m.classes == folder.classes
    assert [os.path.realpath(p) for p in m.items] == [os.path.realpath(p) for p in folder.items]
    assert (m.labels == folder.labels).all()
    assert list(m.split) == [s or "train" for _, _, s in rows]  # unmarked rows train, never dropped
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(
        pa.table({"path": [r[0] for r in rows], "label": [r[1] for r in rows]}), tmp_path / "m.parquet"
    )
    mp = index_source(str(tmp_path / "m.parquet"))
    assert mp.classes == folder.classes and (mp.labels == folder.labels).all()
