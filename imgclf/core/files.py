"""Atomic file writes (readers never see half a file, interrupted writes leave no temporaries) and
the folder names that mark a predefined train/val/test split."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# Folder names (lower-cased) that mark a predefined split, for folders of class folders and of shards.
SPLIT_DIR_NAMES = {
    "train": ("train", "training", "training_set", "train_set"),
    "val": ("val", "valid", "validation", "validation_set", "val_set"),
    "test": ("test", "testing", "test_set"),
}


def canonical_split(name: str) -> str | None:
    """``train``/``val``/``test`` for a split name (``Validation`` counts as val), ``""`` for an
    empty one, None for anything else."""
    s = name.strip().lower()
    if not s:
        return ""
    return next((k for k, names in SPLIT_DIR_NAMES.items() if s in names), None)


def fill_split(split: list[str]) -> tuple[list[str], int]:
    """(splits, how many were filled): when some samples name a split, the ones that name none
    are training images (as marking only the test rows means), never dropped."""
    if not any(split):
        return split, 0
    return [s or "train" for s in split], sum(1 for s in split if not s)


def find_split_dirs(root: Path) -> dict[str, Path]:
    """{split: folder} for the sub-folders of ``root`` named as a split (``Train/`` counts as train)."""
    found: dict[str, Path] = {}
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    for split, names in SPLIT_DIR_NAMES.items():
        for n in names:
            if n in children:
                found[split] = children[n]
                break
    return found


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text: bytes that are not UTF-8 (Python keeps them as surrogates) as ``\\xNN``."""
    s = os.fspath(path)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def text_bytes(text: str) -> bytes:
    """UTF-8 bytes of ``text``; file names that were not UTF-8 keep their original bytes."""
    return text.encode("utf-8", "surrogateescape")


def walk_files(
    root: str | os.PathLike[str], seen: set[tuple[int, int]] | None = None
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every non-hidden file below ``root``, sorted; (files, [(path, why skipped)]).

    Symbolic links to folders are followed once: a link back into a folder already walked (a
    loop) is reported and not entered again, so no file is listed twice. Broken links are reported.
    A folder below ``root`` named like an image file (``x.jpg/``) is reported and not entered: it
    is usually a save or an unpacked archive gone wrong, and its files would be filed silently
    under the class above it. ``seen`` (device, inode) pairs are shared between calls, e.g. over
    the class folders of a dataset.
    """
    from imgclf.core.imageio import IMAGE_EXTENSIONS

    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    seen = set() if seen is None else seen

    def walk(d: Path) -> None:
        try:
            st = d.stat()
        except OSError as e:
            skipped.append((str(d), f"unreadable folder ({e.strerror})"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            skipped.append((str(d), "symbolic link loop: folder already listed"))
            return
        seen.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            skipped.append((str(d), f"unreadable folder ({e.strerror})"))
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            try:
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                skipped.append(
                    (str(p), "folder named like an image file: not listed (rename it to include its files)")
                )
            elif is_dir:
                walk(p)
            elif is_file:
                files.append(p)
            elif e.is_symlink():
                skipped.append((str(p), "broken symbolic link"))

    walk(Path(root))
    return files, skipped


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob (``*``, ``?``, ``[...]``, ``**`` for any depth) as a regex over '/'-separated paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_files(pattern: str, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Files matching a glob pattern, sorted; like ``glob(recursive=True)`` but safe from symlink loops.

    The folder part before the first wildcard is walked once with :func:`walk_files`, so a link
    loop under a ``**`` cannot list a file twice or recurse without end. Hidden files never match.
    ``skipped`` (when given) collects what the walk left out whose path matches the pattern
    (a folder ``x.jpg/`` under ``**/*.jpg``, a link loop under ``**/*``).
    """
    parts = Path(pattern).parts
    k = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    base = Path(*parts[:k]) if k else Path(".")
    if k == len(parts):
        return [base] if base.is_file() else []
    rest = "/".join(parts[k:])
    rx = _glob_regex(rest)
    if not base.is_dir():
        return []
    files, bad = walk_files(base)
    if skipped is not None:
        skipped.extend((p, why) for p, why in bad if rx.match(Path(p).relative_to(base).as_posix()))
    return [f for f in files if rx.match(f.relative_to(base).as_posix())]
