"""The flattening planner: from per-layer indexes to the final tree (pure, no I/O).

Applies, bottom to top, the rules in ../shared/layer-semantics.md: later layers win, whiteouts
and opaque directories delete lower content, type changes replace whole subtrees, parents are
resolved through symlinks *inside* the root, hardlinks bind to the target as it is at that
moment. The result says, for every surviving path, which entry of which layer provides it, so
each surviving file's data is read once and written once, and deleted content is never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from worker.cache.index import IndexEntry, LayerIndex


@dataclass(frozen=True, slots=True)
class PlannedEntry:
    path: str                      # final, canonical path (all parents are real directories)
    layer: int                     # index into the plan's layers of the entry providing it
    entry: IndexEntry              # metadata (and data location) for this path
    link_to: str | None = None     # hardlink: final path of the first path sharing the inode
    implied: bool = False          # a parent directory no layer listed (mode 0755, root:root)


@dataclass(frozen=True, slots=True)
class FlatPlan:
    layers: tuple[LayerIndex, ...]
    entries: tuple[PlannedEntry, ...]   # parents before children; deterministic order
    file_bytes: int                     # sum of apparent sizes of regular files (inodes once)
    file_blocks: int                    # 4 KiB blocks the data needs (sparse-aware)
    counts: dict[str, int]              # entries per EntryKind value, plus "implied"


def plan_layers(layers: Sequence[LayerIndex]) -> FlatPlan:
    """Compute the final tree; raise UnsafeLayerEntry / LayerError naming layer and path."""
    raise NotImplementedError
