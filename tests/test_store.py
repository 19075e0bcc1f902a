"""The decoded store: round trip, incremental updates, damaged shards, streaming training, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import imgclf.data.store as S
from imgclf.cli import main
from imgclf.core.preprocess import Preprocess
from imgclf.data import sources as D
from imgclf.training.api import train
from imgclf.training.config import ConfigError, TrainConfig
from imgclf.training.trainer import epoch_batches

PRE = Preprocess((32, 32), 3)


@pytest.fixture()
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files the store decodes (load_uint8 calls), in order."""
    calls: list[str] = []
    real = S.load_uint8

    def counting(src, pre, **kw):
        calls.append(kw.get("name", ""))
        return real(src, pre, **kw)

    monkeypatch.setattr(S, "load_uint8", counting)
    return calls


def _build(index: D.SourceIndex, cache: Path, **kw) -> D.Decoded:
    return S.build_store(index, np.arange(len(index)), PRE, cache_dir=str(cache), progress=False, **kw)


def _direct(index: D.SourceIndex) -> D.Decoded:
    return D.decode_items(index, np.arange(len(index)), PRE, use_cache=False, progress=False)


def test_round_trip_equals_direct_decoding_and_second_run_reads_shards_only(
    tmp_path: Path, small_sign_folder, decodes: list[str]
) -> None:
    index = D.index_folder(small_sign_folder(tmp_path / "ds", per_class=6))
    ref = _direct(index)
    # Small shards so that the data spans several files.
    got = _build(index, tmp_path / "c", shard_mb=0.02)
    assert isinstance(got.images, S.StoreArray) and len(got.images.files) > 1
    assert got.items == ref.items and np.array_equal(got.labels, ref.labels)
    assert np.array_equal(np.asarray(got.images), ref.images)
    assert len(decodes) == len(index)
    # Every indexing form gives numpy copies of the same rows.
    perm = np.random.default_rng(0).permutation(len(index))
    assert np.array_equal(got.images[perm], ref.images[perm])
    assert np.array_equal(got.images[torch.from_numpy(perm)], ref.images[perm])
    assert np.array_equal(got.images[3:11:2], ref.images[3:11:2])
    assert np.array_equal(got.images[-1], ref.images[-1])
    assert np.array_equal(got.images.subset(perm[:5])[1:3], ref.images[perm[1:3]])
    # Shards are plain .npy files.
    first = np.load(got.images.files[0], mmap_mode="r", allow_pickle=False)
    assert first.dtype == np.uint8 and first.shape[1:] == (32, 32, 3)

    decodes.clear()
    again = _build(index, tmp_path / "c", shard_mb=0.02)
    assert decodes == []
    assert np.array_equal(np.asarray(again.images), ref.images)


def test_added_and_removed_files_decode_only_themselves(
    tmp_path: Path, small_sign_folder, decodes: list[str], sign_dir: Path
) -> None:
    root = small_sign_folder(tmp_path / "ds", per_class=5)
    _build(D.index_folder(root), tmp_path / "c")
    before = S.store_info(str(tmp_path / "c"))["stores"][0]
    removed = sorted((root / "1").iterdir())[0]
    removed.unlink()
    new = root / "0" / "added.jpg"
    shutil.copy(sorted((sign_dir / "7").iterdir())[0], new)
    decodes.clear()
    index = D.index_folder(root)
    got = _build(index, tmp_path / "c")
    assert decodes == [str(new)]
    assert np.array_equal(np.asarray(got.images), _direct(index).images)
    after = S.store_info(str(tmp_path / "c"))["stores"][0]
    assert after["shards"] == before["shards"] + 1  # the new file went to a new shard
    assert after["images"] == before["images"] + 1  # the removed row is kept but no longer asked for


def test_unreadable_files_are_reported_and_remembered(
    tmp_path: Path, small_sign_folder, decodes: list[str]
) -> None:
    root = small_sign_folder(tmp_path / "ds", per_class=3)
    (root / "2" / "truncated.jpg").write_bytes(next((root / "2").iterdir()).read_bytes()[:300])
    (root / "0" / "notes.txt").write_text("not an image")
    index = D.index_folder(root)
    ref = _direct(index)
    for run in range(2):
        decodes.clear()
        got = _build(index, tmp_path / "c")
        assert sorted(Path(p).name for p, _ in got.failed) == ["notes.txt", "truncated.jpg"]
        assert sorted(got.failed) == sorted(ref.failed)
        assert got.items == ref.items and np.array_equal(np.asarray(got.images), ref.images)
        assert len(decodes) == (len(index) if run == 0 else 0)  # the next run decodes nothing
    assert S.store_info(str(tmp_path / "c"))["stores"][0]["failed"] == 2


def test_damaged_shards_are_detected_and_rebuilt(
    tmp_path: Path, small_sign_folder, decodes: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    index = D.index_folder(small_sign_folder(tmp_path / "ds", per_class=4))
    ref = _direct(index)
    cache = str(tmp_path / "c")
    files = _build(index, tmp_path / "c", shard_mb=0.02).images.files
    rows_in = [np.load(f, mmap_mode="r").shape[0] for f in files]
    # Truncate one shard, overwrite another's header.
    with open(files[0], "r+b") as f:
        f.truncate(f.seek(0, 2) - 1000)
    with open(files[1], "r+b") as f:
        f.write(b"garbage!" * 4)
    assert len(S.store_info(cache)["stores"][0]["problems"]) == 2
    assert main(["cache", "info", "--cache-dir", cache]) == 1  # damage is reported, exit 1
    decodes.clear()
    got = _build(index, tmp_path / "c", shard_mb=0.02)
    assert len(decodes) == rows_in[0] + rows_in[1]
    assert np.array_equal(np.asarray(got.images), ref.images)
    assert "decoded again" in caplog.text
    assert S.store_info(cache)["stores"][0]["problems"] == []
    # A flipped pixel keeps the size and header: only the checksum (info --verify) sees it.
    with open(got.images.files[-1], "r+b") as f:
        f.seek(S.HEADER_BYTES + 5)
        b = f.read(1)
        f.seek(S.HEADER_BYTES + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    assert S.store_info(cache)["stores"][0]["problems"] == []
    assert "checksum" in S.store_info(cache, verify=True)["stores"][0]["problems"][0]


def test_streaming_permutation_covers_every_row_once(tmp_path: Path) -> None:
    n, bs = 96, 16
    pre = Preprocess((2, 2), 1)
    # Row i holds the pixel value i, so a batch tells which rows it read.
    rows = [np.full((2, 2, 1), i, dtype=np.uint8) for i in range(n)]
    arr = S.store_arrays([f"k{i}" for i in range(n)], rows, pre, cache_dir=str(tmp_path), shard_mb=0.0002)
    assert len(arr.files) > 1
    y = torch.arange(n)
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(2):
        perm = torch.randperm(n, generator=gen)
        for world in (1, 2):
            seen = []
            for rank in range(world):
                for x, yb in epoch_batches(
                    arr, y, perm, bs, n // bs, pre, None, None, rank, world, prefetch=True
                ):
                    ids = (x[:, 0, 0, 0] * 255).round().long()
                    assert torch.equal(ids, yb)
                    seen += ids.tolist()
            assert sorted(seen) == list(range(n))


def _sign_cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(root), model="lenet", img_size=28, epochs=1, batch_size=8, out=str(out))
    base.update(tensorboard=False, threads=1, workers=1, dedup="off", seed=3, **kw)
    return TrainConfig(**base)


def test_streaming_and_in_memory_training_are_identical(
    tmp_path: Path, small_sign_folder, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="imgclf")
    root = small_sign_folder(tmp_path / "ds", per_class=10)
    mem = train(_sign_cfg(root, tmp_path / "mem"), progress=False)
    assert "data: in memory" in caplog.text
    caplog.clear()
    # auto with a budget below the data streams; the data are 30 x 28x28x3 bytes, about 0.07 MB.
    st = train(_sign_cfg(root, tmp_path / "st", stream="auto", memory_budget_mb=0.01), progress=False)
    assert "data: streaming from the decoded store" in caplog.text
    a, b = (
        load_file(str(mem.bundle_dir / "model.safetensors")),
        load_file(str(st.bundle_dir / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("val_accuracy", "val_loss", "epochs_run")
    assert {k: mem.metrics[k] for k in keep} == {k: st.metrics[k] for k in keep}
    assert json.loads((mem.run_dir / "splits.json").read_text()) == json.loads(
        (st.run_dir / "splits.json").read_text()
    )


def test_plan_and_config() -> None:
    pre = Preprocess((96, 96), 3)
    assert S.plan_storage(1000, pre, "auto", 2048).stream is False
    assert S.plan_storage(100_000, pre, "auto", 2048).stream is True
    assert S.plan_storage(100_000, pre, "off", 1).stream is False
    assert S.plan_storage(1, pre, "on", 2048).stream is True
    with pytest.raises(ConfigError, match="stream"):
        TrainConfig(stream="sometimes").validate()
    with pytest.raises(ConfigError, match="memory_budget_mb"):
        TrainConfig(memory_budget_mb=0).validate()


def test_cache_cli_info_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(tmp_path / "c")
    assert main(["cache", "info", "--cache-dir", cache]) == 0
    assert "decoded stores: none" in capsys.readouterr().out
    pre = Preprocess((4, 4), 1)
    S.store_arrays(
        ["a", "b"], [np.zeros((4, 4, 1), np.uint8), np.ones((4, 4, 1), np.uint8)], pre, cache_dir=cache
    )
    assert main(["cache", "info", "--cache-dir", cache, "--verify"]) == 0
    out = capsys.readouterr().out
    assert cache in out and "4x4x1-bilinear" in out and "checksums ok" in out
    assert main(["cache", "info", "--cache-dir", cache, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["stores"][0]["images"] == 2 and info["stores"][0]["bytes"] > 0
    assert main(["cache", "clear", "--cache-dir", cache, "--key", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such store" in err
    assert main(["cache", "clear", "--cache-dir", cache]) == 0
    assert "cleared" in capsys.readouterr().out
    assert S.store_info(cache)["stores"] == []


def test_compact_drops_rows_of_removed_and_changed_files_and_merges_shards(
    tmp_path: Path, small_sign_folder, decodes: list[str], sign_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import gc

    root = small_sign_folder(tmp_path / "ds", per_class=5)
    cache = str(tmp_path / "c")
    _build(D.index_folder(root), tmp_path / "c", shard_mb=0.02)  # about 6 rows a shard
    # Rows with no file behind them (as built-in sets and tar members store) must survive.
    S.store_arrays(["array-a"], [np.full((32, 32, 3), 7, np.uint8)], PRE, cache_dir=cache, shard_mb=0.02)
    for f in sorted((root / "1").iterdir())[:3]:
        f.unlink()
    changed = sorted((root / "2").iterdir())[0]
    changed.write_bytes(sorted((sign_dir / "9").iterdir())[0].read_bytes())
    shutil.copy(sorted((sign_dir / "7").iterdir())[0], root / "0" / "added.jpg")
    index = D.index_folder(root)
    held = _build(index, tmp_path / "c", shard_mb=0.02).images
    before = S.store_info(cache)["stores"][0]
    assert before["images"] == 15 + 1 + 2  # the old rows stay referenced until compacted
    with pytest.raises(S.DataError, match="running process is reading it"):
        S.compact_store(cache)
    with pytest.raises(S.DataError, match="running process is reading it"):
        S.clear_store(cache)
    del held
    gc.collect()

    assert main(["cache", "compact", "--cache-dir", cache]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("32x32x3-bilinear: 4 changed or removed file(s) forgotten")
    after = S.store_info(cache)["stores"][0]
    assert after["images"] == len(index) + 1 == 14 and after["unreferenced_rows"] == 0
    assert after["shards"] == 1 < before["shards"] and after["bytes"] < before["bytes"]
    assert after["problems"] == [] and S.store_info(cache, verify=True)["stores"][0]["problems"] == []
    assert len(list(Path(before["path"]).glob("shard-*.npy"))) == 1
    # Every current file reads back from the compacted shard without decoding, pixel for pixel.
    decodes.clear()
    got = _build(index, tmp_path / "c")
    assert decodes == []
    assert np.array_equal(np.asarray(got.images), _direct(index).images)
    kept = S.store_arrays(["array-a"], [np.zeros((32, 32, 3), np.uint8)], PRE, cache_dir=cache)
    assert (np.asarray(kept) == 7).all()  # the stored row, not the one offered again
    del got, kept
    gc.collect()
    # Nothing left to drop: a second compaction changes nothing.
    again = S.compact_store(cache)[0]
    assert again["shards"] == [1, 1] and again["rows"] == [14, 14] and again["changed_or_removed_files"] == 0
