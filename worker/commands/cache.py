"""``rootfs-export cache ls`` and ``rootfs-export cache gc``."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys

from worker.cache.blobs import BlobCache
from worker.commands.common import human_size, parse_size, settings_from_args
from worker.settings import Settings


def cmd_cache_ls(args: argparse.Namespace) -> int:
    """List cached blobs, least recently used first."""
    settings = settings_from_args(args)
    cache = BlobCache(settings.cache_dir)
    entries = cache.entries()
    if getattr(args, "json", False):
        json.dump([{"digest": e.digest, "size": e.size, "last_used": e.last_used,
                    "indexed": e.indexed} for e in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for e in entries:
        when = _dt.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"{e.digest}  {human_size(e.size):>10}  {when}  "
              f"{'indexed' if e.indexed else 'blob'}")
    print(f"{len(entries)} blobs, {human_size(sum(e.size for e in entries))} in "
          f"{settings.cache_dir}")
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    """Evict least recently used blobs until the cache fits ``--max-size``."""
    settings = settings_from_args(args)
    max_size = parse_size(args.max_size, option="--max-size")
    cache = BlobCache(settings.cache_dir)
    evicted = cache.gc(max_size)
    for e in evicted:
        print(f"evicted {e.digest} ({human_size(e.size)})")
    print(f"{len(evicted)} blobs evicted, {human_size(sum(e.size for e in evicted))} freed; "
          f"cache now {human_size(cache.total_size())}")
    return 0


def gc_after_use(settings: Settings) -> None:
    """After a successful ``pull`` or ``export``: keep the cache within
    ``ROOTFS_EXPORT_CACHE_MAX_SIZE`` when it is set (LRU eviction, as ``cache gc --max-size``).

    The image just used was touched last, so it goes last; blobs another process holds a lock
    on (reading or writing them) are skipped. Said on stderr (stdout may carry ``--json``); a
    failure here is a warning, never a failed command: the output is already in place.
    """
    if settings.cache_max_size is None:
        return
    cache = BlobCache(settings.cache_dir)
    try:
        evicted = cache.gc(settings.cache_max_size)
        total = cache.total_size()
    except OSError as exc:
        print(f"rootfs-export: warning: cache gc in {settings.cache_dir} failed: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return
    if evicted:
        print(f"cache: evicted {len(evicted)} least recently used blobs "
              f"({human_size(sum(e.size for e in evicted))}) to stay within "
              f"ROOTFS_EXPORT_CACHE_MAX_SIZE={human_size(settings.cache_max_size)}; "
              f"cache now {human_size(total)}", file=sys.stderr)
