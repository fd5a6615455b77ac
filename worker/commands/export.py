"""``rootfs-export export``: pull, flatten and package one image, with progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import TextIO

from worker.commands.cache import gc_after_use
from worker.commands.common import (
    credentials_from_args,
    human_size,
    parse_size,
    settings_from_args,
)
from worker.commands.progress import RichBar
from worker.errors import ConfigError
from worker.export import (
    AddSpec,
    ExportRequest,
    ExportResult,
    Ext4Method,
    Ext4Options,
    OutputFormat,
    export,
)
from worker.progress import Phase, ProgressCallback, ProgressEvent


def _headroom(text: str | None) -> tuple[float | None, int | None]:
    """``--headroom``: a fraction (0.1) or a size (256M) -> (fraction, min_free bytes)."""
    if text is None:
        return None, None
    try:
        value = float(text)
    except ValueError:
        return 0.0, parse_size(text, option="--headroom")
    if not 0 <= value < 100:
        raise ConfigError(f"--headroom: {text!r} is not a fraction (0.1) or a size (256M)")
    return value, None


def _adds(args: argparse.Namespace) -> tuple[AddSpec, ...]:
    from worker.package.adds import parse_add

    return tuple(parse_add(spec, mode=args.add_mode, owner=args.add_owner) for spec in args.add)


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The ExportRequest the ``export`` options describe (ConfigError on bad values)."""
    fmt = OutputFormat(args.format)
    if args.output == "-" and fmt != OutputFormat.TAR:
        raise ConfigError("-o - (standard output) is only possible with --format tar")
    if args.output == "-" and sys.stdout.isatty():
        raise ConfigError("refusing to write a tar to a terminal: redirect standard output "
                          "(-o - > root.tar) or give a file name")
    if args.output == "-" and args.json:
        raise ConfigError("--json cannot be combined with -o - (standard output carries the tar)")
    fraction, min_free = _headroom(args.headroom)
    ext4 = Ext4Options(method=Ext4Method(args.ext4_method),
                       size=parse_size(args.size, option="--size") if args.size else None,
                       headroom=fraction, min_free=min_free, features=args.ext4_features,
                       label=args.label, shrink=args.shrink, strict=args.strict)
    return ExportRequest(image=args.image, output=args.output, format=fmt,
                         platform=args.platform, ext4=ext4, adds=_adds(args),
                         low_disk=args.low_disk, sidecar=not args.no_sidecar)


class _PlainProgress:
    """One line per phase change, per layer finished and at most every 2 s otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.phase: Phase | None = None
        self.layers_done = -1
        self.last = 0.0

    def __call__(self, ev: ProgressEvent) -> None:
        with self.lock:
            now = time.monotonic()
            if ev.phase == self.phase and ev.layers_done == self.layers_done \
                    and now - self.last < 2:
                return
            self.phase, self.layers_done, self.last = ev.phase, ev.layers_done, now
            parts = [str(ev.phase)]
            if ev.layers_total:
                parts.append(f"layers {ev.layers_done}/{ev.layers_total}")
            if ev.bytes_total:
                parts.append(f"{human_size(ev.bytes_done)}/{human_size(ev.bytes_total)}")
            if ev.message:
                parts.append(ev.message)
            print("rootfs-export: " + ": ".join(parts), file=self.stream, flush=True)


class _RichProgress(RichBar):
    """A rich progress bar on stderr: one task, re-labelled per phase."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn

        super().__init__(TextColumn("[bold]{task.fields[phase]:<8}"), BarColumn(),
                         DownloadColumn(), TextColumn("{task.fields[msg]}"),
                         TimeElapsedColumn(), console=Console(stderr=True))
        self.task = self.progress.add_task("export", total=None, phase="resolve", msg="")

    def __call__(self, ev: ProgressEvent) -> None:
        with self.lock:
            if ev.phase == Phase.DONE:
                total = self.progress.tasks[0].total
                self.progress.update(self.task, completed=total or 0, phase="done",
                                     msg=ev.message[:60])
                return
            msg = ev.message
            if ev.layers_total:
                msg = f"layers {ev.layers_done}/{ev.layers_total} {msg}".strip()
            self.progress.update(self.task, total=ev.bytes_total or None,
                                 completed=ev.bytes_done, phase=str(ev.phase), msg=msg[:60])


def _summary(result: ExportResult) -> str:
    c = result.counts
    line = (f"wrote {result.output} ({result.format}, {human_size(result.output_size)}, "
            f"{c.get('entries', 0)} entries: {c.get('file', 0)} files, {c.get('dir', 0)} "
            f"directories, {c.get('symlink', 0)} symlinks, {c.get('hardlink', 0)} hardlinks)")
    if result.sha256:
        line += f"\nsha256 {result.sha256}"
    return line


def cmd_export(args: argparse.Namespace) -> int:
    """Run the export; ``--json`` prints the result object on stdout, else a summary."""
    request = request_from_args(args)
    settings = settings_from_args(args)
    credentials = credentials_from_args(args)
    tty = sys.stderr.isatty()
    bar: _RichProgress | None = _RichProgress() if tty else None
    callback: ProgressCallback = bar if bar is not None else _PlainProgress(sys.stderr)
    cancel = threading.Event()
    try:
        if bar is not None:
            with bar:
                result = export(request, settings, progress=callback, cancel=cancel,
                                credentials=credentials)
        else:
            result = export(request, settings, progress=callback, cancel=cancel,
                            credentials=credentials)
    except KeyboardInterrupt:
        cancel.set()
        raise
    for w in result.warnings:
        print(f"rootfs-export: warning: {w}", file=sys.stderr)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        print(_summary(result), file=sys.stderr if request.output == "-" else sys.stdout)
    gc_after_use(settings)
    return 0
