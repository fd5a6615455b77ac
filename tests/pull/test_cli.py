"""The command-line shell: help text, signals, cached layers."""

from __future__ import annotations

import subprocess
from pathlib import Path

from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_help_describes_the_tool() -> None:
    text = build_parser().format_help()
    assert "Turn OCI/Docker images into root filesystems for microVMs" in text
    assert "``" not in text and "command-line shell" not in text


def test_sidecar_of_the_readme_command_is_ignored() -> None:
    # The README's first command writes root.ext4 and its root.ext4.json sidecar.
    for path in ("root.ext4.json", "sub/x.ext4.json"):
        out = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert out.returncode == 0, f"{path} is not ignored"
