"""imgclf cache info|clear"""

from __future__ import annotations

import argparse
import json

NAME = "cache"
HELP = "show or clear the decoded-image cache (location, disk use, damaged shards)"
DESCRIPTION = (
    "info: where the cache is, each decoded store (one per image size, channels and resize), its "
    "shards, images and disk use; --verify also checks every shard's checksum. clear: delete the "
    "decoded stores and the per-image decode cache (downloaded data sets are kept)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("info", "clear"), help="what to do")
    p.add_argument(
        "--cache-dir", default=None, help="cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)"
    )
    p.add_argument("--key", default=None, help="clear only this store, e.g. 96x96x3-bilinear (see info)")
    p.add_argument("--verify", action="store_true", help="info: read every shard and compare its checksum")
    p.add_argument("--json", action="store_true", help="info: print JSON instead of a table")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from imgclf.core.errors import ConfigError
    from imgclf.data.store import clear_store, store_info, store_root

    if args.action == "clear":
        if args.key and not (store_root(args.cache_dir) / args.key).is_dir():
            known = [s["key"] for s in store_info(args.cache_dir)["stores"]]
            raise ConfigError(f"--key {args.key}: no such store; stores: {', '.join(known) or 'none'}")
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
