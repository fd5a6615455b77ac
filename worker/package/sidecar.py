"""The ``OUT.json`` sidecar: the export result (image config, digests, sha256) beside the output."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from worker.staging import sweep_stale, temp_prefix


def sidecar_path(output: str | os.PathLike[str]) -> Path:
    """``OUT.json`` for output ``OUT``."""
    return Path(os.fspath(output) + ".json")


def write_sidecar(output: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write ``result`` (``ExportResult.to_dict()``) as ``OUT.json`` atomically; return its path."""
    from worker.export import check_output_path

    path = sidecar_path(output)
    check_output_path(str(path), directory=False)   # never over a device node or a symlink
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
