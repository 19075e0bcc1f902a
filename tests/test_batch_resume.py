"""predict-batch on awkward folders: non-UTF-8 names reach the Parquet file, reruns retry failures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from imgclf.cli import main
from imgclf.core.files import display_path

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, small_sign_folder) -> Path:
    """SimpleCNN at 32x32, one epoch on 30 real Sign Language photos (only needs to predict)."""
    import imgclf

    root = small_sign_folder(tmp_path_factory.mktemp("train") / "ds", per_class=10)
    out = tmp_path_factory.mktemp("runs") / "r"
    return imgclf.train(
        data=str(root), model="simplecnn", img_size=32, epochs=1, lr=1e-3, out=str(out)
    ).bundle_dir


def _b(p: Path, name: bytes) -> bytes:
    return os.path.join(os.fsencode(p), name)


def _folder(root: Path, small_sign_folder) -> tuple[Path, bytes]:
    """6 real photos, one under a non-UTF-8 name, one under the UTF-8 name that prints the same
    (a literal backslash), a non-image with a non-UTF-8 name, and a truncated JPEG."""
    small_sign_folder(root / "src", per_class=2)
    d = root / "in"
    d.mkdir()
    photos = sorted((root / "src").rglob("*.JPG"))
    for i, f in enumerate(photos):
        shutil.copy(f, d / f"{i}.jpg")
    shutil.copy(photos[0], _b(d, b"caf\xe9.jpg"))
    shutil.copy(photos[1], d / "caf\\xe9.jpg")  # prints like the name above, is another file
    with open(_b(d, b"bad\xff.jpg"), "wb") as f:
        f.write(b"not an image")
    (d / "cut.jpg").write_bytes(photos[2].read_bytes()[:300])
    return d, os.fsencode(photos[2])


def _run(capsys, bundle: Path, d: Path, out: Path) -> tuple[int, dict, str]:
    rc = main(["predict-batch", str(bundle), "--data", str(d), "--out", str(out), "--no-progress"])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, json.loads(cap.out), cap.err


def _rows(out: Path) -> dict[bytes, dict]:
    rows = pq.read_table(out).to_pylist()
    by_key = {r["path_bytes"]: r for r in rows}
    assert len(by_key) == len(rows)  # one row per file, retries replace the old row
    return by_key


def test_non_utf8_names_and_rerun_retries_failures(tiny_bundle, small_sign_folder, tmp_path, capsys) -> None:
    d, full_photo = _folder(tmp_path, small_sign_folder)
    out = tmp_path / "preds.parquet"

    rc, s, _ = _run(capsys, tiny_bundle, d, out)
    assert rc == 1 and (s["total"], s["predicted"], s["failed"], s["retried"]) == (10, 10, 2, 0)
    rows = _rows(out)
    assert len(rows) == 10
    for key, r in rows.items():
        assert os.path.isfile(os.fsdecode(key))  # the raw bytes open the file
        assert display_path(os.fsdecode(key)) == r["path"]
    odd_key = os.fsencode(os.path.realpath(_b(d, b"caf\xe9.jpg")))
    odd = rows[odd_key]
    same_print = rows[os.fsencode(os.path.realpath(d / "caf\\xe9.jpg"))]
    assert odd["path"] == same_print["path"] and odd["path"].endswith("caf\\xe9.jpg")  # printable text
    assert odd["label"] and same_print["label"] and odd["error"] is None
    bad = rows[os.fsencode(os.path.realpath(_b(d, b"bad\xff.jpg")))]
    assert bad["label"] is None and "bad\\xff.jpg" in bad["error"]
    cut_key = os.fsencode(os.path.realpath(d / "cut.jpg"))
    assert rows[cut_key]["label"] is None and rows[cut_key]["error"]

    # The user repairs one file; the rerun tries both failures again and nothing else.
    with open(os.path.realpath(d / "cut.jpg"), "wb") as f, open(full_photo, "rb") as g:
        f.write(g.read())
    rc, s, err = _run(capsys, tiny_bundle, d, out)
    assert rc == 1 and (s["predicted"], s["already_done"], s["retried"], s["failed"]) == (2, 8, 2, 1)
    assert "tried again 2 file(s) that failed" in err
    again = _rows(out)
    assert len(again) == 10
    assert again[cut_key]["error"] is None and again[cut_key]["label"] is not None
    assert again[odd_key]["probability"] == pytest.approx(odd["probability"])  # kept, not redone

    # A third run: only the still-broken file is tried; a run with nothing left to do is a no-op.
    rc, s, _ = _run(capsys, tiny_bundle, d, out)
    assert (s["predicted"], s["retried"], s["failed"]) == (1, 1, 1) and len(_rows(out)) == 10
    os.unlink(_b(d, b"bad\xff.jpg"))
    rc, s, _ = _run(capsys, tiny_bundle, d, out)
    assert rc == 0 and (s["total"], s["predicted"], s["retried"]) == (9, 0, 0)


def test_crashed_part_with_failures_and_old_format_output(tiny_bundle, small_sign_folder, tmp_path) -> None:
    """A part left by a killed run (holding an error row) and an output written before path_bytes
    existed both resume: the failure is retried and every file ends up with exactly one row."""
    import pyarrow as pa

    from imgclf.runtime.bundle import load_bundle
    from imgclf.serving.batch import parts_dir, predict_dataset, predict_table

    d, full_photo = _folder(tmp_path, small_sign_folder)
    files = sorted(os.path.realpath(os.path.join(os.fsencode(d), n)) for n in os.listdir(os.fsencode(d)))
    utf8 = [os.fsdecode(f) for f in files if b"\xe9" not in f and b"\xff" not in f]
    b = load_bundle(tiny_bundle)
    out = tmp_path / "p.parquet"
    old = predict_table(b, utf8[:3]).drop_columns(["path_bytes"])  # the format before path_bytes
    pq.write_table(old, out)
    parts_dir(out).mkdir()
    cut = os.path.realpath(d / "cut.jpg")
    pq.write_table(predict_table(b, [cut, utf8[3]]), parts_dir(out) / "local-killed-000000.parquet")
    with open(cut, "wb") as f, open(full_photo, "rb") as g:
        f.write(g.read())

    s = predict_dataset(tiny_bundle, [str(d)], out, progress=False)
    assert (s.total, s.already_done, s.retried, s.predicted) == (10, 4, 1, 6)
    assert s.failed == 1  # bad\xff.jpg
    rows = _rows(out)
    assert len(rows) == 10 and rows[os.fsencode(cut)]["error"] is None
    assert pq.read_schema(out).field("path_bytes").type == pa.binary()
    assert not parts_dir(out).exists()


def test_skips_while_listing_are_reported(tiny_bundle, small_sign_folder, tmp_path, capsys) -> None:
    d = small_sign_folder(tmp_path / "in", per_class=2, classes=("0",))
    (d / "0" / "x.jpg").mkdir()
    shutil.copy(next((d / "0").glob("*.JPG")), d / "0" / "x.jpg" / "inside.jpg")
    (d / "0" / "loop").symlink_to(d)
    rc, s, err = _run(capsys, tiny_bundle, d, tmp_path / "p.parquet")
    assert rc == 0 and (s["total"], s["predicted"], s["skipped_while_listing"]) == (2, 2, 2)
    assert f"skipped {d}/0/x.jpg: folder named like an image file" in err
    assert f"skipped {d}/0/loop: symbolic link loop" in err
    assert not any(b"inside" in k for k in _rows(tmp_path / "p.parquet"))
