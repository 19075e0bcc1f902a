"""WebDataset-style .tar shards as --data: same items, decodes and training as the folder; one-line errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from imgclf.core.errors import DataError
from imgclf.core.preprocess import Preprocess
from imgclf.data import dedup, tarsource
from imgclf.data import sources as D


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(index: D.SourceIndex, out: Path, per_shard: int, label: str = "cls") -> list[Path]:
    """The folder's images in its own order, ``per_shard`` samples a shard, labelled by class name."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(index), per_shard):
        path = out / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for k in range(s, min(len(index), s + per_shard)):
                cls = index.classes[int(index.labels[k])]
                _add(tf, f"{k:06d}.jpg", Path(index.items[k]).read_bytes())
                if label == "cls":
                    _add(tf, f"{k:06d}.cls", cls.encode())
                else:
                    _add(tf, f"{k:06d}.json", json.dumps({"label": cls, "source": "test"}).encode())
        shards.append(path)
    return shards


@pytest.fixture(scope="module")
def folder_and_shards(tmp_path_factory: pytest.TempPathFactory, small_sign_folder) -> tuple[Path, Path]:
    root = small_sign_folder(tmp_path_factory.mktemp("folder"), per_class=10, classes=("0", "1", "2"))
    shards = tmp_path_factory.mktemp("shards")
    write_shards(D.index_source(str(root)), shards, per_shard=12)
    return root, shards


def test_shards_list_and_decode_like_the_folder(folder_and_shards: tuple[Path, Path]) -> None:
    root, shards = folder_and_shards
    folder, tar = D.index_source(str(root)), D.index_source(str(shards))
    by_glob = D.index_source(str(shards / "shard-*.tar"))
    assert tar.kind == "tar" and len(list(shards.glob("*.tar"))) == 3
    assert tar.classes == folder.classes == by_glob.classes
    assert tar.labels.tolist() == folder.labels.tolist() == by_glob.labels.tolist()
    assert tar.items == by_glob.items and tar.items[0].endswith("shard-000.tar::000000.jpg")
    pre = Preprocess(size=(32, 32), channels=3)
    idx = np.arange(len(folder))[::-1]  # any order: members are read by byte range
    a = D.decode_items(folder, idx, pre, use_cache=False, progress=False)
    b = D.decode_items(tar, idx, pre, use_cache=False, progress=False)
    assert not b.failed and np.array_equal(a.images, b.images)
    # The doctor's scan reads members too: same content hashes and perceptual hashes.
    fa, fb = dedup.scan(folder, progress=False), dedup.scan(tar, progress=False)
    assert [i.digest for i in fa] == [i.digest for i in fb]
    assert all(np.array_equal(x.phash, y.phash) for x, y in zip(fa, fb))


def test_brace_range_names_shards_and_a_gap_is_one_line(folder_and_shards: tuple[Path, Path]) -> None:
    _, shards = folder_and_shards
    whole = D.index_source(str(shards))
    ranged = D.index_source(str(shards / "shard-{000..002}.tar"))
    assert ranged.items == whole.items and ranged.labels.tolist() == whole.labels.tolist()
    first_two = D.index_source(str(shards / "shard-{000..001}.tar"))
    assert len(first_two) == 24 and first_two.items == whole.items[:24]
    with pytest.raises(DataError, match=r"1 of 4 shards are missing \(first: .*shard-003.tar\)"):
        D.index_source(str(shards / "shard-{000..003}.tar"))
    with pytest.raises(DataError, match="no .tar shards found"):
        D.index_source(str(shards / "other-{0..3}.tar"))


def test_json_labels_and_single_shard(tmp_path: Path, folder_and_shards: tuple[Path, Path]) -> None:
    root, _ = folder_and_shards
    folder = D.index_source(str(root))
    (shard,) = write_shards(folder, tmp_path / "j", per_shard=len(folder), label="json")
    tar = D.index_source(str(shard))
    assert tar.classes == folder.classes and tar.labels.tolist() == folder.labels.tolist()


def test_shards_train_the_same_as_the_folder(tmp_path: Path, folder_and_shards: tuple[Path, Path]) -> None:
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    root, shards = folder_and_shards
    runs = {}
    # The tar run also streams from the decoded store (members read by byte range).
    for name, data, stream in (("folder", root, "off"), ("tar", shards, "on")):
        cfg = TrainConfig(
            data=str(data), model="lenet", img_size=28, epochs=1, batch_size=8, out=str(tmp_path / name),
            tensorboard=False, seed=3, workers=1, stream=stream,
        )  # fmt: skip
        runs[name] = train(cfg, progress=False)
    hf, ht = runs["folder"].history, runs["tar"].history
    assert len(hf) == len(ht) == 1
    for ef, et in zip(hf, ht):
        for k in ("train_loss", "val_loss", "val_acc"):
            assert ef[k] == pytest.approx(et[k], rel=1e-5, abs=1e-6), k


def test_split_folders_of_shards_are_the_predefined_split(
    tmp_path: Path, folder_and_shards: tuple[Path, Path]
) -> None:
    """DIR/{train,val,test}/*.tar splits as DIR/{train,val,test}/<class>/ does, and trains the same."""
    from imgclf.training.api import train
    from imgclf.training.config import TrainConfig

    root, _ = folder_and_shards
    flat = D.index_source(str(root))
    part = {0: "train", 1: "train", 2: "train", 3: "val", 4: "test"}  # by position within its class
    members: dict[str, list[tuple[Path, str]]] = {"train": [], "val": [], "test": []}
    for i, item in enumerate(flat.items):
        cls = flat.classes[int(flat.labels[i])]
        split = part[i % 5]
        link = tmp_path / "folder" / split / cls / Path(item).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(item)
        members[split].append((Path(item), cls))
    for split, files in members.items():
        (tmp_path / "tars" / split).mkdir(parents=True)
        with tarfile.open(tmp_path / "tars" / split / "shard-000.tar", "w") as tf:
            for k, (f, cls) in enumerate(files):
                _add(tf, f"{k:06d}.jpg", f.read_bytes())
                _add(tf, f"{k:06d}.cls", cls.encode())
    folder, tar = D.index_source(str(tmp_path / "folder")), D.index_source(str(tmp_path / "tars"))
    assert tar.kind == "tar" and tar.has_predefined_split
    assert tar.split.tolist() == folder.split.tolist() and tar.labels.tolist() == folder.labels.tolist()
    assert {s: int((tar.split == s).sum()) for s in members} == {"train": 18, "val": 6, "test": 6}
    runs = {}
    for name in ("folder", "tars"):
        cfg = TrainConfig(
            data=str(tmp_path / name), model="lenet", img_size=28, epochs=1, batch_size=8,
            out=str(tmp_path / f"run-{name}"), tensorboard=False, seed=3, workers=1,
        )  # fmt: skip
        runs[name] = train(cfg, progress=False)
    assert runs["tars"].metrics["test_size"] == 6
    for k in ("train_loss", "val_loss", "val_acc"):
        assert runs["tars"].history[0][k] == pytest.approx(
            runs["folder"].history[0][k], rel=1e-5, abs=1e-6
        ), k
    # Another sub-folder beside the split folders: not a split of shards (nor a folder source).
    (tmp_path / "tars" / "extra").mkdir()
    assert not tarsource.is_tar_spec(str(tmp_path / "tars"))


def _one_line(e: pytest.ExceptionInfo, name: str) -> None:
    assert name in str(e.value) and "\n" not in str(e.value)


def test_truncated_shard_is_a_one_line_error(tmp_path: Path, folder_and_shards: tuple[Path, Path]) -> None:
    _, shards = folder_and_shards
    good = (shards / "shard-000.tar").read_bytes()
    bad = tmp_path / "cut" / "shard-000.tar"
    bad.parent.mkdir()
    bad.write_bytes(good[: len(good) // 2 + 100])
    with pytest.raises(DataError) as e:
        D.index_source(str(bad))
    _one_line(e, str(bad))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DataError) as e:
        D.index_source(str(junk))
    _one_line(e, str(junk))


def test_compressed_shards_are_one_line_with_the_fix(
    tmp_path: Path, folder_and_shards: tuple[Path, Path]
) -> None:
    import gzip

    from imgclf.cli import main

    _, shards = folder_and_shards
    packed = tmp_path / "gz" / "shard-000.tar.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress((shards / "shard-000.tar").read_bytes()))
    for spec in (packed, packed.parent, tmp_path / "gz" / "shard-{000..000}.tar.gz"):
        with pytest.raises(DataError) as e:
            D.index_source(str(spec))
        _one_line(e, str(packed))
        assert "gunzip" in str(e.value)
    assert main(["inspect", "--data", str(packed), "--out", str(tmp_path / "o")]) == 2


def test_member_without_label_is_a_one_line_error(tmp_path: Path, sign_dir: Path) -> None:
    shard = tmp_path / "nolabel.tar"
    photos = sorted((sign_dir / "0").iterdir())[:2]
    with tarfile.open(shard, "w") as tf:
        _add(tf, "a.jpg", photos[0].read_bytes())
        _add(tf, "a.cls", b"0")
        _add(tf, "b.jpg", photos[1].read_bytes())  # no b.cls / b.json
    with pytest.raises(DataError) as e:
        D.index_source(str(shard))
    _one_line(e, str(shard))
    assert "b.jpg" in str(e.value)


def test_cli_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imgclf.cli import main

    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\0" * 10 + b"x" * 600)
    assert main(["inspect", "--data", str(junk), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(junk) in err and len(err.splitlines()) == 1


def test_json_split_values_mark_samples_and_unmarked_ones_train(
    tmp_path: Path, folder_and_shards: tuple[Path, Path]
) -> None:
    """A ``split`` in a sample's JSON is its predefined split; samples without one train (not dropped)."""
    from imgclf.training.recipes import config_from
    from imgclf.training.trainer import prepare_data, resolve_defaults

    root, _ = folder_and_shards
    flat = D.index_source(str(root))
    marks = {0: "test", 1: "Validation"}  # any split name the folders accept
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for k, item in enumerate(flat.items):
            meta: dict[str, str] = {"label": flat.classes[int(flat.labels[k])]}
            if k % 5 in marks:
                meta["split"] = marks[k % 5]
            _add(tf, f"{k:06d}.jpg", Path(item).read_bytes())
            _add(tf, f"{k:06d}.json", json.dumps(meta).encode())
    tar = D.index_source(str(tmp_path / "shard-000.tar"))
    want = ["test" if k % 5 == 0 else "val" if k % 5 == 1 else "train" for k in range(len(flat))]
    assert tar.has_predefined_split and tar.split.tolist() == want
    cfg = resolve_defaults(config_from({"data": str(tmp_path / "shard-000.tar"), "recipe": "default"}), tar)
    data = prepare_data(cfg, tar, Preprocess((32, 32), 3), False)
    sizes = {s: len(d.labels) for s, d in (("train", data.train), ("val", data.val), ("test", data.test))}
    assert sizes == {s: want.count(s) for s in ("train", "val", "test")}  # 18 / 6 / 6: none lost

    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        _add(tf, "a.jpg", Path(flat.items[0]).read_bytes())
        _add(tf, "a.json", json.dumps({"label": "0", "split": "later"}).encode())
    with pytest.raises(DataError) as e:
        D.index_source(str(tmp_path / "bad.tar"))
    _one_line(e, "a.json")
    assert "split='later'" in str(e.value)
    # A JSON split that contradicts the split folder holding the shard.
    (tmp_path / "tars" / "train").mkdir(parents=True)
    with tarfile.open(tmp_path / "tars" / "train" / "s.tar", "w") as tf:
        for k in (0, 10):
            _add(tf, f"{k}.jpg", Path(flat.items[k]).read_bytes())
            _add(tf, f"{k}.json", json.dumps({"label": str(k), "split": "test"}).encode())
    with pytest.raises(DataError) as e:
        D.index_source(str(tmp_path / "tars"))
    _one_line(e, "s.tar")
    assert "inside the 'train' folder" in str(e.value)
