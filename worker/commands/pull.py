"""``rootfs-export inspect`` and ``rootfs-export pull``."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, TextIO

from worker.cache.blobs import BlobCache
from worker.commands.cache import gc_after_use
from worker.commands.common import credentials_from_args, human_size, settings_from_args
from worker.commands.progress import RichBar
from worker.progress import LayerState, ProgressEvent
from worker.pull.fetch import LayerTiming, fetch_layers
from worker.pull.manifest import Platform
from worker.pull.reference import parse_reference
from worker.pull.registry import RegistryClient


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the resolved image (manifest, platform, layers, runtime config) as JSON."""
    settings = settings_from_args(args)
    creds = credentials_from_args(args)
    ref = parse_reference(args.image)
    platform = Platform.parse(args.platform) if args.platform else None
    with RegistryClient.for_reference(ref, settings, credentials=creds) as client:
        resolved = client.resolve(ref, platform)
    json.dump(resolved.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


class _PlainReporter:
    """One line per layer state change, for logs and pipes."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._seen: dict[str, LayerState] = {}
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            for lp in event.layers:
                if self._seen.get(lp.digest) == lp.state or lp.state is LayerState.WAITING:
                    continue
                self._seen[lp.digest] = lp.state
                self._out.write(f"{lp.digest[:19]}  {lp.state:<11}  "
                                f"{human_size(lp.bytes_total)}\n")
                self._out.flush()


class _RichReporter(RichBar):
    """A rich progress bar: one overall bar plus one per layer."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        super().__init__(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                         TransferSpeedColumn(), TimeRemainingColumn(), console=console)
        self._tasks: dict[str, Any] = {}
        self._total: Any = None

    def __call__(self, event: ProgressEvent) -> None:
        with self.lock:
            if self._total is None:
                self._total = self.progress.add_task("total", total=event.bytes_total or None)
            self.progress.update(self._total, completed=event.bytes_done,
                                 description=f"{event.layers_done}/{event.layers_total} layers")
            for lp in event.layers:
                task = self._tasks.get(lp.digest)
                if task is None:
                    task = self._tasks[lp.digest] = self.progress.add_task(
                        lp.digest[7:19], total=lp.bytes_total or None)
                self.progress.update(task, completed=lp.bytes_done,
                                     description=f"{lp.digest[7:19]} {lp.state}")


def cmd_pull(args: argparse.Namespace) -> int:
    """Download, verify and index every layer of the image into the cache."""
    settings = settings_from_args(args)
    creds = credentials_from_args(args)
    ref = parse_reference(args.image)
    platform = Platform.parse(args.platform) if args.platform else None
    cache = BlobCache(settings.cache_dir)
    err = sys.stderr
    timings: list[LayerTiming] = []
    started = time.monotonic()
    with RegistryClient.for_reference(ref, settings, credentials=creds) as client:
        resolved = client.resolve(ref, platform)
        err.write(f"{resolved.reference} ({resolved.platform}) {resolved.manifest_digest}: "
                  f"{len(resolved.layers)} layers, "
                  f"{human_size(sum(d.size for d in resolved.layers))}\n")
        if err.isatty():
            from rich.console import Console

            with _RichReporter(Console(file=err)) as bar:
                indexes = fetch_layers(resolved, settings, client=client, cache=cache,
                                       progress=bar, timings=timings)
        else:
            indexes = fetch_layers(resolved, settings, client=client, cache=cache,
                                   progress=_PlainReporter(err), timings=timings)
    seconds = time.monotonic() - started
    entries = sum(len(i.entries) for i in indexes)
    usize = sum(i.uncompressed_size for i in indexes)
    if args.json:
        by_digest = {t.digest: t for t in timings}
        layers = []
        for index in indexes:
            t = by_digest.get(index.digest)
            layers.append({
                "digest": index.digest, "diff_id": index.diff_id,
                "compression": index.compression,
                "compressed_bytes": index.compressed_size,
                "uncompressed_bytes": index.uncompressed_size, "entries": len(index.entries),
                "cached": t is None,
                "download_seconds": round(t.download_seconds, 4) if t else None,
                "index_seconds": round(t.index_seconds, 4) if t else None,
            })
        json.dump({"image": resolved.reference, "manifest_digest": resolved.manifest_digest,
                   "platform": str(resolved.platform), "cache_dir": str(settings.cache_dir),
                   "layers": layers, "entries": entries, "uncompressed_bytes": usize,
                   "seconds": round(seconds, 4)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"pulled {resolved.reference}@{resolved.manifest_digest}: {len(indexes)} layers, "
              f"{entries} entries, {human_size(usize)} uncompressed, cache {settings.cache_dir}")
    gc_after_use(settings)
    return 0
