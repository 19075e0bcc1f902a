r"""Batch prediction of many images into one Parquet file: streaming, bounded memory, resumable.

Two engines produce the same rows (``path, path_bytes, label, probability, top_k, unknown, ood_score,
error``; for a multi-label bundle ``path, path_bytes, labels, p_<label>..., error``, see
:func:`schema`):

* local (default): this process decodes with a thread pool and predicts chunk by chunk;
* Ray Data (``workers=N``, ``pip install 'imgclf[ray]'``): the list of paths becomes a Ray
  Dataset, ``N`` actors each load the bundle once and read, decode and predict their batches
  lazily, and Ray writes the Parquet parts as results stream in.

Results first go to part files in ``OUT.parts/`` (each written atomically or discarded when
damaged); a re-run skips every path already predicted in ``OUT`` or a part, tries the files that
failed before again (their old error rows are dropped), then merges all parts into ``OUT`` one
part at a time, so memory stays bounded by one chunk.

File names need not be UTF-8 (Linux allows any bytes) while Parquet text must be: ``path`` is
the name as printable UTF-8 text (bytes that are not UTF-8 written as ``\xNN``, like
:func:`imgclf.core.files.display_path`), and ``path_bytes`` holds the name's raw bytes
(``os.fsencode``), so ``os.fsdecode(row["path_bytes"])`` opens the file. Resuming matches
``path_bytes``, since two different names can print the same.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.core.files import display_path
from imgclf.core.imageio import ImageDecodeError
from imgclf.data.sources import DataError
from imgclf.runtime.bundle import Bundle, load_bundle, resolve_bundle_dir
from imgclf.runtime.predict import expand_paths, why_missing

log = logging.getLogger("imgclf")


def _require_pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DataError(
            "predict-batch writes Parquet and needs pyarrow: pip install pyarrow "
            "(or pip install 'imgclf[ray]' for the Ray engine too)"
        ) from e
    return pa


PROB_PREFIX = "p_"


def schema(bundle: Bundle | None = None) -> Any:
    """The Parquet schema of a predictions file (single-label unless ``bundle`` is multi-label).

    Multi-label: ``labels`` (list<string>, the predicted set, most probable first; empty when no
    label reaches its threshold, null when the file failed) and one float32 column
    ``p_<label>`` per label in the bundle's order. Separate columns rather than one list column:
    each is self-describing (no class order to look up), filterable with Parquet predicate
    pushdown (``filters=[("p_red", ">", 0.9)]``) and readable column by column, and they match
    ``imgclf predict --csv``. The labels and thresholds also ride in the schema metadata
    (``imgclf.classes``, ``imgclf.thresholds``) so a set can be re-derived at other thresholds.
    """
    pa = _require_pyarrow()
    if bundle is not None and bundle.multi_label:
        fields = [
            ("path", pa.string()),
            ("path_bytes", pa.binary()),
            ("labels", pa.list_(pa.string())),
            *((PROB_PREFIX + c, pa.float32()) for c in bundle.classes),
            ("error", pa.string()),
        ]
        meta = {
            "imgclf.task": "multi-label",
            "imgclf.classes": json.dumps(bundle.classes),
            "imgclf.thresholds": json.dumps([float(t) for t in bundle.thresholds]),
        }
        return pa.schema(fields, metadata=meta)
    top = pa.struct([("label", pa.string()), ("probability", pa.float32())])
    return pa.schema(
        [
            ("path", pa.string()),
            ("path_bytes", pa.binary()),
            ("label", pa.string()),
            ("probability", pa.float32()),
            ("top_k", pa.list_(top)),
            # Null when the bundle has no unknown-image rejection (or the file failed).
            ("unknown", pa.bool_()),
            ("ood_score", pa.float32()),
            ("error", pa.string()),
        ]
    )


def predict_table(bundle: Bundle, paths: Sequence[str], *, top_k: int = 5, threads: int = 1) -> Any:
    """Decode and predict ``paths``; one row per path, unreadable files carry ``error``.

    The columns are :func:`schema` of ``bundle`` (``top_k`` applies to single-label bundles).
    """
    pa = _require_pyarrow()

    def load(p: str) -> np.ndarray | str:
        try:
            return bundle.prepare(p)
        except ImageDecodeError as e:
            return str(e)
        except OSError as e:  # vanished or unreadable file: recorded, not fatal
            return f"{p}: {e.strerror or e}"

    if threads > 1:
        with ThreadPoolExecutor(threads) as ex:  # PIL decodes release the GIL
            loaded = list(ex.map(load, paths))
    else:
        loaded = [load(p) for p in paths]
    ok = [i for i, x in enumerate(loaded) if isinstance(x, np.ndarray)]
    failed = {"labels": None} if bundle.multi_label else {"label": None, "probability": None, "top_k": []}
    rows: list[dict[str, Any]] = [
        {**failed, "error": display_path(x)} if isinstance(x, str) else {} for x in loaded
    ]
    if ok:
        probs, scores = bundle.predict_scored(np.stack([loaded[i] for i in ok]))
        for i, r in zip(ok, bundle.top_k(probs, top_k, scores)):
            if bundle.multi_label:
                p = r.pop("probabilities")
                r.update({PROB_PREFIX + c: p[c] for c in bundle.classes})
            rows[i] = {**r, "error": None}
    for p, r in zip(paths, rows):
        # Parquet text must be UTF-8: the name as printable text, plus its raw bytes for opening it.
        r["path"], r["path_bytes"] = display_path(p), os.fsencode(p)
    return pa.Table.from_pylist(rows, schema=schema(bundle))


@dataclass
class BatchSummary:
    out: Path
    total: int  # files matched by the inputs
    predicted: int  # predicted in this run
    already_done: int  # skipped: predicted (without error) in the output or a part from an earlier run
    failed: int  # rows of this run with an error
    retried: int  # files that failed in an earlier run and were tried again in this one
    seconds: float
    engine: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) left out while listing

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "total": self.total,
            "predicted": self.predicted,
            "already_done": self.already_done,
            "failed": self.failed,
            "retried": self.retried,
            "skipped_while_listing": len(self.skipped),
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.predicted / max(self.seconds, 1e-9), 1),
            "engine": self.engine,
        }


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _part_files(out: Path) -> list[Path]:
    pdir = parts_dir(out)
    return sorted(p for p in pdir.rglob("*.parquet") if not p.name.startswith(".")) if pdir.exists() else []


def _read_keys(f: Path) -> tuple[list[bytes], list[bool]]:
    """(raw path bytes, has an error) per row; files from before ``path_bytes`` use ``path``."""
    import pyarrow.parquet as pq

    names = pq.ParquetFile(f).schema_arrow.names
    key = "path_bytes" if "path_bytes" in names else "path"
    t = pq.read_table(f, columns=[key, "error"])
    keys = t.column(key).to_pylist()
    if key == "path":
        keys = [k.encode("utf-8") for k in keys]
    return keys, [e is not None for e in t.column("error").to_pylist()]


def _done_paths(out: Path) -> tuple[set[bytes], set[bytes]]:
    """(predicted, failed) raw paths in ``out`` and its parts; damaged parts are deleted (redone).

    A path predicted in one file and failed in another (a retry that worked) counts as predicted.
    """
    done: set[bytes] = set()
    failed: set[bytes] = set()
    for f in ([out] if out.exists() else []) + _part_files(out):
        try:
            keys, errs = _read_keys(f)
        except Exception as e:  # a part cut short by a crash: its rows are predicted again
            if f == out:
                raise DataError(
                    f"{out}: exists but is not a readable predictions Parquet file ({e}); "
                    "choose another --out or delete it"
                ) from e
            log.warning("discarding damaged part %s (%s)", f, e)
            f.unlink()
            continue
        for k, bad in zip(keys, errs):
            (failed if bad else done).add(k)
    return done, failed - done


def _write_part(table: Any, path: Path) -> None:
    """Atomic: a crash leaves no half-written part with a final name."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def check_compatible(out: Path, sch: Any) -> None:
    """A DataError when ``out`` or a part holds predictions of another kind of model than ``sch``'s
    (single- vs multi-label, or other labels): merging would drop or invent columns."""
    import pyarrow.parquet as pq

    want = set(sch.names)
    # Columns that older single-label files may lack; _conform fills them in.
    optional = {"path_bytes", "unknown", "ood_score"}
    for f in ([out] if out.exists() else []) + _part_files(out):
        try:
            have = set(pq.ParquetFile(f).schema_arrow.names)
        except Exception:  # unreadable: _done_paths reports it (output) or discards it (part)
            continue
        if not (want - optional) <= have or (
            "labels" in want and have - {"path_bytes"} != want - {"path_bytes"}
        ):
            cols = sorted(have)
            raise DataError(
                f"{f}: holds predictions of another model (columns {', '.join(cols[:8])}"
                f"{', ...' if len(cols) > 8 else ''}); choose another --out or delete it"
            )


def merge_parts(out: Path, drop: set[bytes] | None = None, sch: Any = None) -> int:
    """Stream ``out`` (if any) and every part into a new ``out``; returns the row count.

    ``drop``: raw paths whose error rows are left out (files about to be tried again).
    ``sch``: the file's schema (:func:`schema` of the bundle; default single-label).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pa = _require_pyarrow()
    parts = _part_files(out)
    if not parts and not drop and out.exists():
        return pq.ParquetFile(out).metadata.num_rows
    sch = sch if sch is not None else schema()
    sources = ([out] if out.exists() else []) + parts
    drop_keys = pa.array(sorted(drop or ()), type=pa.binary())
    tmp = out.with_name(f".{out.name}.merge.tmp")
    n = 0
    with pq.ParquetWriter(tmp, sch) as w:
        for src in sources:
            pf = pq.ParquetFile(src)
            for rb in pf.iter_batches(batch_size=65536):  # one row group at a time: bounded memory
                tb = _conform(rb, sch)
                if len(drop_keys):
                    retry = pc.and_(
                        pc.is_in(tb.column("path_bytes"), value_set=drop_keys), pc.is_valid(tb["error"])
                    )
                    tb = tb.filter(pc.invert(retry))
                w.write_table(tb)
                n += tb.num_rows
    os.replace(tmp, out)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return n


def _conform(rb: Any, sch: Any) -> Any:
    """A batch from any part as a table of exactly ``sch`` (Ray may widen or reorder).

    Files written before ``path_bytes`` existed get it from ``path`` (then always UTF-8).
    """
    import pyarrow.compute as pc

    pa = _require_pyarrow()
    t = pa.Table.from_batches([rb])
    if "path_bytes" not in t.column_names:
        t = t.append_column("path_bytes", pc.cast(t.column("path"), pa.binary()))
    for name in ("unknown", "ood_score"):  # parts written before unknown-image rejection existed
        if name in sch.names and name not in t.column_names:
            t = t.append_column(name, pa.nulls(len(t), sch.field(name).type))
    return pa.table([t.column(f.name).cast(f.type) for f in sch], schema=sch)


def _run_local(
    bundle: Bundle, todo: list[str], pdir: Path, *, top_k: int, batch_size: int, chunk: int, progress: bool
) -> int:
    from tqdm import tqdm

    threads = max(1, min(8, os.cpu_count() or 1))
    failed = 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tqdm(total=len(todo), desc="predict-batch", unit="img", disable=not progress) as bar:
        for c, s in enumerate(range(0, len(todo), chunk)):
            paths = todo[s : s + chunk]
            tables = []
            for b in range(0, len(paths), batch_size):
                t = predict_table(bundle, paths[b : b + batch_size], top_k=top_k, threads=threads)
                tables.append(t)
                bar.update(t.num_rows)
            import pyarrow as pa

            table = pa.concat_tables(tables)
            failed += table.num_rows - table.column("error").null_count
            _write_part(table, pdir / f"local-{stamp}-{c:06d}.parquet")
    return failed


class _RayPredictor:
    """A Ray Data actor: loads the bundle once, then predicts batches of paths."""

    def __init__(self, bundle_dir: str, top_k: int) -> None:
        import torch

        torch.set_num_threads(1)  # one core per actor; Ray schedules one actor per CPU
        self.bundle = load_bundle(bundle_dir)
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        # Paths travel as raw bytes: Arrow text must be UTF-8, file names need not be.
        return predict_table(self.bundle, [os.fsdecode(bytes(p)) for p in batch["path"]], top_k=self.top_k)


def _run_ray(
    bundle_dir: Path,
    todo: list[str],
    pdir: Path,
    *,
    workers: int,
    address: str | None,
    top_k: int,
    batch_size: int,
    chunk: int,
    progress: bool,
) -> int:
    from imgclf.training.distributed import init_ray

    started = init_ray(address)
    import ray
    import ray.data

    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        stamp = time.strftime("%Y%m%d-%H%M%S")
        failed = 0
        # One Ray Data pipeline per chunk: each finished chunk is on disk, so a crash loses at most one.
        for c, s in enumerate(range(0, len(todo), chunk)):
            paths = todo[s : s + chunk]
            ds = ray.data.from_items(
                [{"path": os.fsencode(p)} for p in paths], override_num_blocks=max(1, workers * 2)
            )
            ds = ds.map_batches(
                _RayPredictor,
                fn_constructor_args=(str(bundle_dir), top_k),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=1,
                batch_format="numpy",
            )
            tmp = pdir / f".ray-{stamp}-{c:06d}"
            ds.write_parquet(str(tmp))
            import pyarrow.parquet as pq

            for i, f in enumerate(sorted(tmp.glob("*.parquet"))):
                err = pq.read_table(f, columns=["error"]).column("error")
                failed += len(err) - err.null_count
                os.replace(f, pdir / f"ray-{stamp}-{c:06d}-{i:04d}.parquet")
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if started:
            ray.shutdown()
    return failed


def predict_dataset(
    bundle: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    *,
    workers: int | None = None,
    address: str | None = None,
    top_k: int = 5,
    batch_size: int = 256,
    chunk: int = 8192,
    progress: bool | None = None,
) -> BatchSummary:
    """Predict every image under ``inputs`` (folders, files, globs) into the Parquet file ``out``.

    ``workers`` (or ``address``) selects the Ray Data engine; otherwise this process does the work.
    Paths already predicted in ``out`` (or its parts) are skipped, so an interrupted run resumes;
    files that failed in an earlier run are tried again and their old error rows replaced.
    """
    _require_pyarrow()
    t0 = time.time()
    if progress is None:
        progress = sys.stderr.isatty()
    out = Path(out).resolve()
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give a file name such as {out / 'predictions.parquet'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    bdir = resolve_bundle_dir(bundle)
    b = load_bundle(bdir)  # fail fast, before listing millions of files
    skipped: list[tuple[str, str]] = []
    files, missing = expand_paths(list(inputs), skipped)
    if missing:
        raise DataError("; ".join(f"{m}: {why_missing(m)}" for m in missing))
    if not files:
        raise DataError(f"no image files under {', '.join(inputs)}")
    files = [str(Path(f).resolve()) for f in files]
    sch = schema(b)
    check_compatible(out, sch)
    done, failed_before = _done_paths(out)
    keys = [os.fsencode(f) for f in files]
    todo = [f for f, k in zip(files, keys) if k not in done]
    retry = failed_before.intersection(keys)
    already = len(files) - len(todo)
    if retry:
        log.info("trying again %d file(s) that failed in an earlier run", len(retry))
        # Their error rows go now, so a crash before the retry is written leaves them still to do.
        merge_parts(out, drop=retry, sch=sch)
    pdir = parts_dir(out)
    pdir.mkdir(exist_ok=True)
    engine = "local"
    failed = 0
    if todo:
        if workers or address:
            engine = f"ray x{workers or 1}"
            failed = _run_ray(
                bdir,
                todo,
                pdir,
                workers=int(workers or 1),
                address=address,
                top_k=top_k,
                batch_size=batch_size,
                chunk=max(chunk, batch_size),
                progress=progress,
            )
        else:
            failed = _run_local(
                b,
                todo,
                pdir,
                top_k=top_k,
                batch_size=batch_size,
                chunk=max(chunk, batch_size),
                progress=progress,
            )
    merge_parts(out, sch=sch)
    return BatchSummary(
        out, len(files), len(todo), already, failed, len(retry), time.time() - t0, engine, skipped
    )


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a predictions file (small files and tests)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
