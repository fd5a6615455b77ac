"""Image mtimes (float seconds, as tar headers and the cache index carry them) as whole
seconds plus nanoseconds, the one conversion every writer uses so that the dir and tar outputs
and all three ext4 methods agree to the nanosecond.

Split before scaling: ``mtime * 1e9`` loses the fraction to float rounding (a float near
1.6e9 s has ~240 ns of resolution, its product with 1e9 only 256 ns steps, up to 128 ns off);
``mtime - floor(mtime)`` is exact, and so is its scaled, rounded value.
"""

from __future__ import annotations

import math

#: what ext4 times hold: a signed 32-bit field plus two epoch bits counting extra 2^32 s
#: (1901-12-13 to 2446-05-10); the kernel clamps to the same range
EXT4_RANGE = (-(2 ** 31), 2 ** 31 - 1 + 3 * 2 ** 32)
#: whole seconds whose nanoseconds still fit a signed 64-bit count (what utimensat takes)
NS_RANGE = (-((1 << 63) // 1_000_000_000) + 1, (1 << 63) // 1_000_000_000 - 1)


def split_time(mtime: float, bounds: tuple[int, int] = NS_RANGE) -> tuple[int, int]:
    """(seconds, nanoseconds) of ``mtime``, seconds clamped to ``bounds``; NaN is 0.

    Hostile values (inf, 1e30) are clamped, not a crash.
    """
    if mtime != mtime:   # NaN
        return 0, 0
    low, high = bounds
    mtime = max(float(low), min(float(high), float(mtime)))
    seconds = math.floor(mtime)
    ns = min(999_999_999, round((mtime - seconds) * 1_000_000_000))
    return seconds, ns


def to_ns(mtime: float) -> int:
    """``mtime`` as integer nanoseconds (for ``os.utime(ns=...)``), clamped to 64 bits."""
    seconds, ns = split_time(mtime)
    return seconds * 1_000_000_000 + ns


def pax_time(mtime: float) -> str:
    """``mtime`` as a PAX ``mtime`` record value with the same nanoseconds as :func:`to_ns`
    (``str(float)`` would give readers another rounding than the dir writer's)."""
    seconds, ns = split_time(mtime)
    if not ns:
        return str(seconds)
    if seconds < 0:   # PAX: the fraction has the sign of the whole value
        seconds, ns = seconds + 1, 1_000_000_000 - ns
        return f"-{-seconds}.{ns:09d}".rstrip("0")
    return f"{seconds}.{ns:09d}".rstrip("0")
