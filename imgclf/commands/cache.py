"""imgclf cache info|compact|clear"""

from __future__ import annotations

import argparse
import json

NAME = "cache"
HELP = "show, compact or clear the decoded-image cache (location, disk use, damaged shards)"
DESCRIPTION = (
    "info: where the cache is, each decoded store (one per image size, channels and resize), its "
    "shards, images and disk use; --verify also checks every shard's checksum. compact: rewrite "
    "the stores without the images of files removed or changed since they were decoded, merging "
    "small shards (images of built-in data sets and tar shards are kept). clear: delete the "
    "decoded stores and the per-image decode cache (downloaded data sets are kept). compact and "
    "clear refuse while a training run streams from a store."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("info", "compact", "clear"), help="what to do")
    p.add_argument(
        "--cache-dir", default=None, help="cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)"
    )
    p.add_argument(
        "--key", default=None, help="compact or clear only this store, e.g. 96x96x3-bilinear (see info)"
    )
    p.add_argument("--verify", action="store_true", help="info: read every shard and compare its checksum")
    p.add_argument("--json", action="store_true", help="info, compact: print JSON instead of a table")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from imgclf.core.errors import ConfigError
    from imgclf.data.store import clear_store, compact_store, store_info, store_root

    if args.key and not (store_root(args.cache_dir) / args.key).is_dir():
        known = [s["key"] for s in store_info(args.cache_dir)["stores"]]
        raise ConfigError(f"--key {args.key}: no such store; stores: {', '.join(known) or 'none'}")
    if args.action == "compact":
        done = compact_store(args.cache_dir, args.key)
        if args.json:
            print(json.dumps(done, indent=2))
            return 0
        if not done:
            print(f"no decoded stores in {store_root(args.cache_dir)}")
        for s in done:
            (s0, s1), (r0, r1), (b0, b1) = s["shards"], s["rows"], s["bytes"]
            print(
                f"{s['key']}: {s['changed_or_removed_files']:,} changed or removed file(s) forgotten; "
                f"{s0} -> {s1} shard(s), {r0:,} -> {r1:,} stored images, {_mb(b0)} -> {_mb(b1)}"
            )
        return 0
    if args.action == "clear":
        freed = clear_store(args.cache_dir, args.key)
        print(f"cleared {_mb(freed)} from {store_root(args.cache_dir) / (args.key or '')}")
        return 0
    info = store_info(args.cache_dir, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"cache: {info['path']}")
    if not info["stores"]:
        print("decoded stores: none")
    for s in info["stores"]:
        state = "; ".join(s["problems"]) if s["problems"] else ("checksums ok" if args.verify else "sizes ok")
        if "shards" in s:
            print(
                f"  {s['key']:<22} {s['shards']:>4} shard(s) {s['images']:>9,} images "
                f"({s['unreferenced_rows']:,} unreferenced, {s['failed']:,} unreadable) "
                f"{_mb(s['bytes']):>12}  {state}"
            )
        else:
            print(f"  {s['key']:<22} {_mb(s['bytes']):>12}  {state}")
    for name, size in info["other"].items():
        print(f"  {name + '/':<22} {_mb(size):>12}")
    bad = sum(len(s["problems"]) for s in info["stores"])
    return 1 if bad else 0
