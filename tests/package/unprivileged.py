"""Run as an unprivileged user by test_rootless.py: build an ext4 image, print a JSON report.

``python -m tests.package.unprivileged WORKDIR METHOD [--strict] [--newline]``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.package.helpers import build, make_plan
from tests.support.imagebuilder import TarEntry, directory, file
from worker.errors import RootfsExportError

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)


def layers(newline: bool = False) -> list[list[TarEntry]]:
    extra = [file("etc/weird\nname", "w", uid=7)] if newline else []
    return [extra + [
        directory("etc", mtime=1_400_000_000),
        file("etc/shadow", "root:*:1::::::\n", mode=0o000),
        directory("home/alice", uid=1000, gid=1000, mode=0o700),
        file("home/alice/notes", "n", uid=1000, gid=1000, mode=0o600),
        file("usr/bin/su", b"\x7fELF", mode=0o4755),
        file("usr/bin/ping", b"\x7fELF", mode=0o755, xattrs={"security.capability": CAP}),
        TarEntry("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        TarEntry("dev/sda", "block", mode=0o660, gid=6, devmajor=8, devminor=0),
    ]]


def main() -> int:
    work, method = Path(sys.argv[1]), sys.argv[2]
    strict = "--strict" in sys.argv
    report: dict[str, object] = {"euid": os.geteuid()}
    plan, locate = make_plan(work, layers("--newline" in sys.argv))
    try:
        result = build(plan, locate, work / "out.ext4", method=method, strict=strict)
    except RootfsExportError as exc:
        report.update(error=type(exc).__name__, message=str(exc))
    else:
        report.update(method=str(result.method), warnings=list(result.warnings),
                      output=str(result.output))
    report["leftovers"] = sorted(p.name for p in work.iterdir() if p.name.startswith(".out"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
