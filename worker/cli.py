"""Turn OCI/Docker images into root filesystems for microVMs: ext4, tar or a directory.

The command-line shell over the engine.
Each sub-command parses its options, builds settings, calls one engine function and prints the
result. Errors the user can act on (:class:`~worker.errors.RootfsExportError`) are printed as
one line on stderr with a non-zero exit status; no traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from worker.errors import RootfsExportError


def _add_registry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry")
    g.add_argument("--platform", help="os/arch[/variant], default: this host's")
    g.add_argument("--username", help="registry user name (password from --password-stdin)")
    g.add_argument("--password-stdin", action="store_true",
                   help="read the registry password or token from standard input")
    g.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                   help="reach HOST over plain HTTP (loopback hosts always may)")
    g.add_argument("--cache-dir", help="blob cache (default ~/.cache/rootfs-export)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rootfs-export", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print an image's manifest, layers and config as JSON")
    p.add_argument("image")
    _add_registry_options(p)
    p.set_defaults(handler="worker.commands.pull:cmd_inspect")

    p = sub.add_parser("pull", help="download, verify and index an image's layers into the cache")
    p.add_argument("image")
    _add_registry_options(p)
    p.add_argument("--concurrency", type=int, help="parallel layer downloads")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object, with per-layer timings")
    p.set_defaults(handler="worker.commands.pull:cmd_pull")

    p = sub.add_parser("export", help="export an image as an ext4 disk image, a tar or a directory")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="output path ('-' for a tar on stdout)")
    p.add_argument("--format", choices=["ext4", "tar", "dir"], default="ext4")
    _add_registry_options(p)
    p.add_argument("--concurrency", type=int, help="parallel layer downloads")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--low-disk", action="store_true",
                   help="delete each compressed layer from the cache once it is applied")
    e = p.add_argument_group("ext4")
    e.add_argument("--ext4-method", choices=["auto", "direct", "stream", "mount", "dir"], default="auto")
    e.add_argument("--size", help="image size (e.g. 2G, 512M); default: sized from the content")
    e.add_argument("--headroom", help="free space to add: a fraction (0.1) or a size (256M)")
    e.add_argument("--ext4-features", default="default",
                   help="'default', 'compat' (older guest kernels) or a mke2fs -O list")
    e.add_argument("--label", default="rootfs", help="filesystem label")
    e.add_argument("--shrink", action="store_true", help="shrink to the minimum before headroom")
    e.add_argument("--strict", action="store_true",
                   help="fail instead of losing ownership/devices (non-root dir method)")
    e.add_argument("--no-sidecar", action="store_true", help="do not write OUT.json")
    e.add_argument("--add", action="append", default=[], metavar="SRC:DEST",
                   help="lay a local file or directory on top of the image (repeatable)")
    e.add_argument("--add-mode", help="octal mode for --add files (default: keep source mode)")
    e.add_argument("--add-owner", default="0:0", help="uid:gid for --add entries")
    p.set_defaults(handler="worker.commands.export:cmd_export")

    p = sub.add_parser("cache", help="list or trim the blob cache")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    c = csub.add_parser("ls", help="list cached blobs, least recently used first")
    c.add_argument("--cache-dir")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler="worker.commands.cache:cmd_cache_ls")
    c = csub.add_parser("gc", help="evict least recently used blobs above --max-size")
    c.add_argument("--cache-dir")
    c.add_argument("--max-size", required=True, help="e.g. 10G")
    c.set_defaults(handler="worker.commands.cache:cmd_cache_gc")

    p = sub.add_parser("worker", help="start a Celery worker (fetch and/or package queues)")
    p.add_argument("--queues", help="comma-separated queues (default: fetch,package.<node>)")
    p.add_argument("--node", help="node name owning outputs (default: ROOTFS_EXPORT_NODE)")
    p.add_argument("--concurrency", type=int, help="worker processes")
    p.set_defaults(handler="worker.commands.service:cmd_worker")

    p = sub.add_parser("serve", help="start the REST API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(handler="worker.commands.service:cmd_serve")

    p = sub.add_parser("db", help="manage the job database")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    d = dsub.add_parser("upgrade", help="apply Alembic migrations up to head")
    d.set_defaults(handler="worker.commands.service:cmd_db_upgrade")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rootfs-export`` console script."""
    import importlib
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    # The service commands (Celery, uvicorn) handle SIGTERM themselves.
    previous = None if module_name.endswith(".service") else _catch_sigterm()
    try:
        return int(handler(args) or 0)
    except RootfsExportError as exc:
        print(f"rootfs-export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("rootfs-export: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("rootfs-export: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so ``finally`` blocks remove temps and outputs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _catch_sigterm() -> tuple[Any] | None:
    """Turn SIGTERM into :class:`Terminated`; return (previous handler,), None if not set.

    Only the main thread may install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    return (previous if previous is not None else signal.SIG_DFL,)


if __name__ == "__main__":
    sys.exit(main())
