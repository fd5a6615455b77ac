"""Root-only checks fail loudly where the tests do not run as root: never a silent skip."""

from __future__ import annotations

import os

import pytest


def require_root(why: str) -> None:
    """Fail the current test with ``why`` unless running as root (CI always is)."""
    if os.geteuid() != 0:
        pytest.fail(f"needs root ({why}): run ./scripts/test as root, as .ci/run does",
                    pytrace=False)
