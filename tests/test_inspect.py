"""The dataset doctor on small folders of real Sign Language photos with planted problems."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf import cli
from imgclf.analysis.doctor import DoctorReport, inspect_source, summary_text, write_html, write_report
from imgclf.data import sources as D
from imgclf.data.dedup import NEAR_THRESHOLD, dedup_for_training
from imgclf.training.config import TrainConfig


def _png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with a tiny IDAT (a pixel bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _near_copy(src: Path, dst: Path, scale: float = 0.7, quality: int = 70) -> None:
    """Resized and re-encoded: different bytes, same picture."""
    im = Image.open(src).convert("RGB")
    im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.BILINEAR).save(
        dst, "JPEG", quality=quality
    )


def _files(root: Path, c: str) -> list[Path]:
    return sorted((root / c).iterdir())


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, small_sign_folder) -> Path:
    root = small_sign_folder(tmp_path_factory.mktemp("planted") / "ds", per_class=8)
    f0, f1, f2 = _files(root, "0"), _files(root, "1"), _files(root, "2")
    shutil.copy(f0[0], root / "0" / "copy_of_first.jpg")  # exact duplicate in one class
    _near_copy(f1[0], root / "1" / "near_copy.jpg")  # near-duplicate
    shutil.copy(f2[0], root / "0" / "conflict.jpg")  # same image in classes 0 and 2
    (root / "1" / "truncated.jpg").write_bytes(f1[1].read_bytes()[:700])
    Image.open(f2[1]).convert("RGB").save(root / "2" / "really_png.gif", "PNG")
    f2[1].unlink()  # moved, not copied: otherwise it is (rightly) a near-duplicate of its source
    Image.open(f2[2]).convert("RGB").resize((1, 1)).save(root / "2" / "one_pixel.png")
    (root / "0" / "bomb.png").write_bytes(_png_bomb())
    return root


@pytest.fixture(scope="module")
def report(planted: Path) -> dict:
    return inspect_source(str(planted), progress=False).to_dict()


def _paths(entries: list[dict]) -> set[str]:
    return {e["path"] for e in entries}


def _groups(entries: list[dict]) -> list[set[str]]:
    return [{e["path"] for e in g["items"]} for g in entries]


def test_unreadable_files_found_with_reason(report: dict) -> None:
    by_path = {e["path"]: e for e in report["unreadable"]}
    assert set(by_path) == {"1/truncated.jpg", "0/bomb.png"}
    assert by_path["1/truncated.jpg"]["reason"] == "truncated image"
    assert by_path["0/bomb.png"]["reason"] == "too many pixels"


def test_extension_mismatch_and_sizes(report: dict) -> None:
    assert report["extension_mismatch"] == [
        {"path": "2/really_png.gif", "class": "2", "extension": ".gif", "format": "PNG"}
    ]
    assert _paths(report["tiny"]) == {"2/one_pixel.png"}
    assert report["tiny"][0]["size"] == [1, 1]
    assert report["enormous"] == []


def test_exact_near_and_conflict_groups(planted: Path, report: dict) -> None:
    f0, f1, f2 = (_files(planted, c)[0].name for c in "012")
    assert _groups(report["exact_duplicates"]) == [
        {f"0/{f0}", "0/copy_of_first.jpg"},
        {"0/conflict.jpg", f"2/{f2}"},
    ]
    # Only the planted near copy: the other real photos (similar hands, same backdrop) stay apart.
    assert _groups(report["near_duplicates"]) == [{f"1/{f1}", "1/near_copy.jpg"}]
    assert 0 < report["near_duplicates"][0]["max_distance"] <= NEAR_THRESHOLD
    assert _groups(report["label_conflicts"]) == [{"0/conflict.jpg", f"2/{f2}"}]
    assert report["label_conflicts"][0]["classes"] == ["0", "2"]


def test_per_class_and_totals(report: dict) -> None:
    pc = report["per_class"]
    assert [pc[c]["images"] for c in "012"] == [8 + 3, 8 + 2, 8 + 1]
    assert pc["0"]["unreadable"] == 1 and pc["1"]["unreadable"] == 1 and pc["2"]["unreadable"] == 0
    assert pc["0"]["exact_duplicate_copies"] == 1
    assert pc["2"]["formats"] == {"JPEG": 7, "PNG": 2}
    assert pc["2"]["width_range"] == [1, 100]
    t = report["totals"]
    assert (t["images"], t["readable"], t["label_conflicts"], t["leakage_groups"]) == (30, 28, 1, 0)
    assert report["imbalance"]["ratio"] == pytest.approx(10 / 9, abs=1e-3)


def test_cli_writes_json_html_and_table(planted: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rep"
    assert cli.main(["inspect", "--data", str(planted), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "TOTAL" in text and "1/truncated.jpg: truncated image" in text
    assert "2/really_png.gif: named .gif, is PNG" in text
    saved = json.loads((out / "inspect.json").read_text())
    assert saved["totals"]["exact_duplicate_groups"] == 2
    page = (out / "inspect.html").read_text()
    # one inline thumbnail per member of the 2 exact groups, the near group and the conflict
    assert page.count("src='data:image/jpeg;base64,") == 2 + 2 + 2 + 2
    assert "http://" not in page and "https://" not in page
    assert cli.main(["inspect", "--data", str(planted), "--out", str(out), "--json", "--strict"]) == 1
    assert json.loads(capsys.readouterr().out)["totals"]["unreadable"] == 2


def test_typed_report_round_trips_to_inspect_json(planted: Path, tmp_path: Path) -> None:
    rep = inspect_source(str(planted), progress=False)
    assert isinstance(rep, DoctorReport)
    written = write_report(rep, tmp_path / "rep")
    assert [p.name for p in written] == ["inspect.json", "inspect.html"]
    saved = json.loads((tmp_path / "rep" / "inspect.json").read_text())
    assert saved == rep.to_dict()
    # The typed fields say the same as the JSON.
    assert {e.path: e.reason for e in rep.unreadable} == {e["path"]: e["reason"] for e in saved["unreadable"]}
    assert rep.totals.images == saved["totals"]["images"] == 30
    assert rep.per_class["2"].formats == saved["per_class"]["2"]["formats"]
    assert [g.kind for g in rep.exact_duplicates] == ["exact", "exact"]
    assert rep.near_duplicates[0].max_distance == saved["near_duplicates"][0]["max_distance"]
    assert rep.label_conflicts[0].classes == ["0", "2"]
    assert rep.imbalance.ratio == saved["imbalance"]["ratio"]
    assert rep.problems == 2 + 1 + 0
    # summary_text and write_html take the report or its dict alike.
    assert summary_text(rep) == summary_text(saved)
    write_html(saved, rep.index, tmp_path / "from_dict.html")
    page = (tmp_path / "rep" / "inspect.html").read_text()
    assert (tmp_path / "from_dict.html").read_text() == page


def test_no_near_records_no_threshold(planted: Path) -> None:
    rep = inspect_source(str(planted), near=False, progress=False)
    assert rep.settings.near_threshold is None and rep.to_dict()["settings"]["near_threshold"] is None
    assert rep.near_duplicates == [] and len(rep.exact_duplicates) == 2
    assert "not checked (--no-near)" in summary_text(rep)


def test_cli_bad_data_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["inspect", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_leakage_across_predefined_split(tmp_path: Path, small_sign_folder) -> None:
    root = tmp_path / "split"
    small_sign_folder(root / "train", per_class=5, classes=("0", "1"))
    small_sign_folder(root / "test", per_class=0, classes=("0", "1"))
    src = _files(root / "train", "1")[3]
    _near_copy(src, root / "test" / "1" / "leaked.jpg", scale=0.5, quality=80)
    shutil.copy(_files(root / "train", "0")[0], root / "test" / "0" / "same.jpg")
    rep = inspect_source(str(root), progress=False).to_dict()
    assert rep["splits_checked"] == ["test", "train"]
    assert _groups(rep["leakage"]) == [
        {f"train/0/{_files(root / 'train', '0')[0].name}", "test/0/same.jpg"},
        {f"train/1/{src.name}", "test/1/leaked.jpg"},
    ]


def test_dedup_for_training_drops_bad_and_groups_copies(planted: Path) -> None:
    index = D.index_source(str(planted))
    rel = [index.relpath(i) for i in index.items]
    usable, groups, rep = dedup_for_training(index, TrainConfig(data=str(planted)), progress=False)
    kept = {rel[i] for i in usable}
    f0, f1, f2 = (_files(planted, c)[0].name for c in "012")
    for gone in ("1/truncated.jpg", "0/bomb.png", "0/conflict.jpg", f"2/{f2}"):
        assert gone not in kept
    assert {p for p, _ in ((index.relpath(i), r) for i, r in index.skipped)} >= {
        "1/truncated.jpg",
        "0/bomb.png",
        "0/conflict.jpg",
    }
    assert len(usable) == 30 - 4 and groups is not None and len(groups) == len(usable)
    gid = dict(zip((rel[i] for i in usable), groups))
    assert gid[f"0/{f0}"] == gid["0/copy_of_first.jpg"]
    assert gid[f"1/{f1}"] == gid["1/near_copy.jpg"]
    assert len(set(groups)) == len(usable) - 2
    assert rep["label_conflict_images"] == 2 and rep["unreadable"] == 2

    index = D.index_source(str(planted))
    usable, groups, rep = dedup_for_training(index, TrainConfig(data=str(planted), dedup="keep-one"), False)
    kept = [rel[i] for i in usable]
    assert groups is None and rep["dropped_copies"] == 2 and len(kept) == 30 - 4 - 2
    assert len({f"0/{f0}", "0/copy_of_first.jpg"} & set(kept)) == 1
    assert len({f"1/{f1}", "1/near_copy.jpg"} & set(kept)) == 1


def test_training_with_dedup_group_keeps_groups_in_one_split(tmp_path: Path, small_sign_folder) -> None:
    from imgclf.training.api import train

    root = small_sign_folder(tmp_path / "ds", per_class=10, classes=("0", "1"))
    planted_groups = []
    for c in ("0", "1"):
        for k, f in enumerate(_files(root, c)[:4]):
            a, b = root / c / f"copy{k}.jpg", root / c / f"near{k}.jpg"
            shutil.copy(f, a)
            _near_copy(f, b, scale=0.6 + 0.1 * k)
            planted_groups.append({f"{c}/{f.name}", f"{c}/{a.name}", f"{c}/{b.name}"})
    index = D.index_source(str(root))
    rel = [index.relpath(i) for i in index.items]
    gid = np.asarray(
        [next((n for n, g in enumerate(planted_groups) if r in g), -1 - i) for i, r in enumerate(rel)]
    )
    # Control: an ungrouped split of this data does separate planted copies, so the check below can fail.
    plain = D.split_indices(index.labels, {"val": 0.3, "test": 0.3}, seed=42)
    side = {int(i): name for name, idx in plain.items() for i in idx}
    assert any(len({side[i] for i in np.flatnonzero(gid == n)}) > 1 for n in range(len(planted_groups)))

    res = train(
        TrainConfig(
            data=str(root),
            model="lenet",
            img_size=28,
            epochs=1,
            val_split=0.3,
            test_split=0.3,
            out=str(tmp_path / "run"),
            tensorboard=False,
            dedup="group",
        ),
        progress=False,
    )
    splits = json.loads((res.run_dir / "splits.json").read_text())
    where = {p: name for name, paths in splits.items() for p in paths}
    assert len(where) == len(rel)
    for g in planted_groups:
        assert len({where[p] for p in g}) == 1, (g, {p: where[p] for p in g})
    assert {"train", "val", "test"} <= set(splits)


def test_class_weights_auto_weights_loss_by_inverse_frequency(
    tmp_path: Path, small_sign_folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.nn.functional as F

    from imgclf.training import trainer as T
    from imgclf.training.api import train

    root = small_sign_folder(tmp_path / "ds", per_class=12, classes=("0", "1"))
    for f in _files(root, "1")[4:]:
        f.unlink()  # 12 vs 4 images: imbalanced
    seen: list = []
    real = F.cross_entropy

    def spy(inp, target, weight=None, **kw):
        seen.append(weight)
        return real(inp, target, weight=weight, **kw)

    monkeypatch.setattr(T.F, "cross_entropy", spy)
    res = train(
        TrainConfig(
            data=str(root),
            model="lenet",
            img_size=28,
            epochs=1,
            batch_size=4,
            val_split=0.25,
            out=str(tmp_path / "run"),
            tensorboard=False,
            class_weights="auto",
        ),
        progress=False,
    )
    splits = json.loads((res.run_dir / "splits.json").read_text())
    counts = np.bincount([int(p.split("/")[0]) for p in splits["train"]], minlength=2).astype(float)
    expected = counts.sum() / (2 * counts)
    assert seen and seen[0] is not None
    np.testing.assert_allclose(seen[0].numpy(), expected, rtol=1e-6)
    assert seen[0][1] > 2 * seen[0][0]  # the small class weighs more


def test_training_warns_of_rare_missing_and_imbalanced_classes(
    tmp_path: Path, small_sign_folder, caplog: pytest.LogCaptureFixture
) -> None:
    from imgclf.training.api import train

    def run(root: Path, name: str) -> str:
        caplog.clear()
        cfg = TrainConfig(
            data=str(root), model="lenet", img_size=28, epochs=1, val_split=0.2, test_split=0.2,
            out=str(tmp_path / name), tensorboard=False,
        )  # fmt: skip
        with caplog.at_level("WARNING", logger="imgclf"):
            train(cfg, progress=False)
        return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")

    root = small_sign_folder(tmp_path / "imb", per_class=50, classes=("0", "1", "2"))
    for f in _files(root, "1")[2:]:
        f.unlink()  # 50 / 2 / 50 real photos: class 1 is too small, and missing from val or test
    said = run(root, "imb")
    assert "fewer than 5 training images: 1 (" in said
    assert "split has no image of 1 class(es) (1)" in said
    assert "classes are imbalanced" in said and "--class-weights auto" in said
    # The control: the same photos, balanced, draw none of these warnings.
    balanced = small_sign_folder(tmp_path / "bal", per_class=20, classes=("0", "1", "2"))
    said = run(balanced, "bal")
    assert "fewer than" not in said and "no image of" not in said and "imbalanced" not in said


def test_sign_language_digits_is_clean_except_three_big_photos(sign_dir: Path) -> None:
    """The real dataset: no unreadable files, duplicates or conflicts; three 3024x3024 photos in class 7."""
    rep = inspect_source(str(sign_dir), progress=False).to_dict()
    t = rep["totals"]
    assert t["images"] == t["readable"] == 2062
    assert (t["exact_duplicate_groups"], t["near_duplicate_groups"], t["label_conflicts"]) == (0, 0, 0)
    assert rep["per_class"]["7"]["width_range"] == [100, 3024]
    assert rep["imbalance"]["suggestion"].startswith("balanced")
