"""WebDataset-style ``.tar`` shards as a ``--data`` source.

A shard holds samples as members sharing a key: ``key.jpg`` (or png, webp, ...) plus ``key.cls``
(a class name or a class index, as text) or ``key.json`` (an object with ``label``, ``cls`` or
``class``). ``--data`` names one shard, a glob of shards, a brace range as WebDataset writes
it (``shards-{000..099}.tar``, expanded by ``braceexpand``), a folder holding them (and no
sub-folders) or a folder of ``train/``, ``val/`` and ``test/`` folders of shards (a predefined
split, as for folders of class folders; a ``split`` value in a sample's ``.json`` works too,
and samples without one are then training samples). Listing reads the tar headers once and remembers each
image's byte range, so decoding any subset in any order (what
:func:`imgclf.data.sources.decode_items` and the splits need) is one seek and one read; the
``webdataset`` package streams shards in order instead, which fits a training loop but not random
subsets, so plain :mod:`tarfile` lists them here.

Items are ``<shard path>::<member name>``. This module does not import :mod:`imgclf.data.sources`
(sources imports it: the layer test forbids cycles), so :func:`list_tars` returns a
:class:`TarListing` that ``index_source`` turns into a ``SourceIndex``.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.core.errors import DataError
from imgclf.core.files import canonical_split, find_split_dirs

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pnm"}
LABEL_EXTS = ("cls", "json")
JSON_LABEL_KEYS = ("label", "cls", "class")
MAX_LABEL_BYTES = 1 << 16  # a .cls/.json label is a few bytes; refuse to read a huge one
SEP = "::"
# Compressed shards are refused with the fix: random access needs a plain tar, and JPEG/PNG
# members barely compress, so decompressing costs little disk.
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def _is_shard(name: str) -> bool:
    return name.endswith(".tar") or name.lower().endswith(COMPRESSED)


def is_tar_spec(spec: str) -> bool:
    """Whether ``spec`` names .tar shards: a .tar file, a glob or brace range ending in .tar, a
    folder of them, or a folder of split folders (``train/``, ``val/``, ``test/``) of them."""
    if _is_shard(spec):
        return True
    p = Path(spec)
    if p.is_dir():
        try:
            return _shard_folder(p) or bool(_split_shard_folders(p))
        except OSError:
            return False
    return False


def _shard_folder(p: Path) -> bool:
    """Shards and no sub-folders: a folder of class folders with a stray .tar in it stays a folder."""
    children = list(p.iterdir())
    has_dirs = any(c.is_dir() and not c.name.startswith(".") for c in children)
    return not has_dirs and any(_is_shard(c.name) and c.is_file() for c in children)


def _split_shard_folders(p: Path) -> dict[str, Path]:
    """{split: folder} when every sub-folder of ``p`` is a split folder of shards (train among them)."""
    splits = find_split_dirs(p)
    dirs = [c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")]
    if "train" not in splits or len(dirs) != len(splits):
        return {}
    return splits if all(_shard_folder(d) for d in splits.values()) else {}


def shard_paths(spec: str) -> list[Path]:
    """The shards ``spec`` names, sorted; DataError when there are none."""
    p = Path(spec)
    if p.is_dir():
        dirs = list(_split_shard_folders(p).values()) or [p]
        found = [f for d in dirs for f in sorted(c for c in d.iterdir() if _is_shard(c.name) and c.is_file())]
    elif "{" in spec and not p.is_file():
        from braceexpand import braceexpand

        named = {Path(f): Path(f).is_file() for f in braceexpand(spec)}  # the range's own order
        missing = [f for f, here in named.items() if not here]
        if missing and len(missing) < len(named):
            # A range that names absent shards is a typo or an unfinished copy: training on the
            # rest would silently drop data.
            raise DataError(
                f"--data {spec!r}: {len(missing)} of {len(named)} shards are missing (first: {missing[0]}); "
                "fix the range or copy the missing shards"
            )
        found = [f for f, here in named.items() if here]
    elif glob.has_magic(spec):
        found = sorted(Path(f) for f in glob.glob(spec) if _is_shard(f) and os.path.isfile(f))
    else:
        found = [p] if p.is_file() else []
    if not found:
        raise DataError(f"--data {spec!r}: no .tar shards found")
    packed = [f for f in found if f.name.lower().endswith(COMPRESSED)]
    if packed:
        raise DataError(
            f"{packed[0]}: compressed shards are not read ({len(packed)} of {len(found)}); images are "
            "read by seeking in a plain .tar: decompress them first (e.g. gunzip -k shard.tar.gz, "
            "or tar -xf and re-pack with tar -cf)"
        )
    return found


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key rule: everything before the first dot of the base name is the key."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower() if dot else ""


def _label_text(shard: Path, name: str, ext: str, raw: bytes) -> tuple[str, str]:
    """(label text, split) of a ``.cls`` or ``.json`` member; the split ("" when not given) is
    the JSON's ``split`` value."""
    split = ""
    if ext == "cls":
        text = raw.decode("utf-8", "replace").strip()
    else:
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{shard}: {name} is not valid JSON ({e})") from e
        val = next((obj[k] for k in JSON_LABEL_KEYS if isinstance(obj, dict) and k in obj), None)
        if val is None or isinstance(val, (dict, list)):
            raise DataError(f"{shard}: {name} has no label (expected one of {', '.join(JSON_LABEL_KEYS)})")
        text = str(val).strip()
        given = obj.get("split")
        split = canonical_split(given) if isinstance(given, str) else ("" if given is None else None)
        if split is None:
            raise DataError(f"{shard}: {name} has split={given!r}; use train, val or test (or leave it out)")
    if not text:
        raise DataError(f"{shard}: {name} is an empty label")
    return text, split


@dataclass
class TarListing:
    """Samples of a set of shards: item ids, label texts resolved to classes, byte ranges."""

    name: str
    root: str
    classes: list[str]
    items: list[str]
    labels: np.ndarray
    ranges: dict[str, tuple[str, int, int]]  # item -> (shard path, data offset, size)
    split: np.ndarray  # "train"/"val"/"test" per item from split folders or its JSON, else ""

    def read(self, item: str) -> bytes:
        """The bytes of one image member (OSError when the shard changed or went away)."""
        path, offset, size = self.ranges[item]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: {item.rpartition(SEP)[2]} is cut short")
        return data


def _list_shard(shard: Path) -> list[tuple[str, tuple[str, str], int, int]]:
    """(member name, (label text, split), data offset, size) per image of one shard."""
    size = shard.stat().st_size
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, tuple[str, str]] = {}
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise DataError(f"{shard}: truncated ({m.name} runs past the end of the file)")
                key, ext = _split_name(m.name)
                if ext in IMAGE_EXTS:
                    images[key] = m
                elif ext in LABEL_EXTS and key not in labels:
                    if m.size > MAX_LABEL_BYTES:
                        raise DataError(f"{shard}: {m.name} is {m.size} bytes, too big for a label")
                    f = tf.extractfile(m)
                    labels[key] = _label_text(shard, m.name, ext, f.read() if f else b"")
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{shard}: truncated or not a tar file ({e})") from e
    except OSError as e:
        raise DataError(f"{shard}: cannot read ({e})") from e
    missing = [m.name for k, m in images.items() if k not in labels]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{shard}: {missing[0]}{more} has no .cls or .json label member")
    return [(m.name, labels[k], m.offset_data, m.size) for k, m in images.items()]


def list_tars(spec: str) -> TarListing:
    """List every image of the shards ``spec`` names (see :func:`is_tar_spec`) with its class."""
    shards = shard_paths(spec)
    split_of = {d: k for k, d in _split_shard_folders(Path(spec)).items()} if Path(spec).is_dir() else {}
    items: list[str] = []
    texts: list[str] = []
    splits: list[str] = []
    ranges: dict[str, tuple[str, int, int]] = {}
    for shard in shards:
        folder_split = split_of.get(shard.parent, "")
        for name, (text, split), offset, size in _list_shard(shard):
            if folder_split and split and split != folder_split:
                raise DataError(
                    f"{shard}: {name} says split={split!r} inside the {folder_split!r} folder; "
                    "drop the JSON split or move the shard"
                )
            item = f"{shard}{SEP}{name}"
            items.append(item)
            texts.append(text)
            splits.append(folder_split or split)
            ranges[item] = (str(shard), offset, size)
    if not items:
        raise DataError(f"--data {spec!r}: the shards hold no images")
    names = sorted(set(texts))
    if all(t.lstrip("-").isdigit() for t in names):
        names = sorted(names, key=int)  # class indices: 2 before 10
    if len(names) < 2:
        raise DataError(f"--data {spec!r}: found one class ({names[0]}); a classifier needs at least two")
    cidx = {c: i for i, c in enumerate(names)}
    if Path(spec).is_dir():
        root = Path(spec)
    else:
        root = shards[0].parent if len(shards) > 1 else shards[0]
    return TarListing(
        name=spec,
        root=str(root),
        classes=names,
        items=items,
        labels=np.asarray([cidx[t] for t in texts], dtype=np.int64),
        ranges=ranges,
        split=np.asarray(splits, dtype=object),
    )
