"""ext4 feature profiles: what ``--ext4-features`` means, made explicit for mke2fs.

Features are always passed as ``-O none,<list>`` so the result never depends on the host's
``/etc/mke2fs.conf``.

``default`` (current guest kernels, >= 5.15, and e2fsprogs >= 1.47 inside the guest)
    the e2fsprogs 1.47 ext4 defaults: has_journal, extent, huge_file, flex_bg, metadata_csum,
    metadata_csum_seed, 64bit, dir_nlink, extra_isize, orphan_file on top of the base set
    (sparse_super, large_file, filetype, resize_inode, dir_index, ext_attr).
``compat`` (older guest kernels >= 4.4 and e2fsprogs >= 1.43 inside the guest)
    the same without ``orphan_file`` (an e2fsck older than 1.47 refuses the filesystem) and
    without ``metadata_csum_seed`` (an incompat feature older tools do not know); metadata_csum
    and 64bit stay (kernel 3.18 / e2fsprogs 1.43 know them).
anything else
    a comma-separated mke2fs ``-O`` list, passed through as given after ``none`` (so it must
    list every feature wanted; ``^feature`` entries are accepted and simply drop a feature).
"""

from __future__ import annotations

import re

from worker.errors import ConfigError

BASE = ("sparse_super", "large_file", "filetype", "resize_inode", "dir_index", "ext_attr")

PROFILES: dict[str, tuple[str, ...]] = {
    "default": (*BASE, "has_journal", "extent", "huge_file", "flex_bg", "metadata_csum",
                "metadata_csum_seed", "64bit", "dir_nlink", "extra_isize", "orphan_file"),
    "compat": (*BASE, "has_journal", "extent", "huge_file", "flex_bg", "metadata_csum",
               "64bit", "dir_nlink", "extra_isize"),
}

_FEATURE_RE = re.compile(r"^\^?[a-z0-9_]+$")


def resolve_features(spec: str) -> tuple[str, ...]:
    """The explicit feature list for a profile name or a ``-O`` list; ConfigError if malformed."""
    name = spec.strip()
    if name in PROFILES:
        return PROFILES[name]
    items = [item.strip() for item in name.split(",") if item.strip()]
    if not items:
        raise ConfigError("--ext4-features: empty feature list "
                          "(use 'default', 'compat' or a comma-separated mke2fs -O list)")
    bad = [item for item in items if not _FEATURE_RE.match(item)]
    if bad:
        raise ConfigError(f"--ext4-features: malformed feature name(s) {', '.join(bad)} "
                          "(use 'default', 'compat' or a comma-separated mke2fs -O list)")
    kept: list[str] = []
    for item in items:
        if item.startswith("^"):
            kept = [k for k in kept if k != item[1:]]
        elif item not in kept:
            kept.append(item)
    return tuple(kept)


def mke2fs_option(features: tuple[str, ...]) -> str:
    """The ``-O`` argument: clear everything, then enable exactly ``features``."""
    return ",".join(("none", *features))
