"""Layers from real tars placed in a local blob cache, without a registry (writer unit tests).

The same bytes the registry tests push; the index comes from the real indexer.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.imagebuilder import Layer
from worker.cache.index import LayerIndex, index_tar_stream
from worker.flatten.plan import FlatPlan, plan_layers
from worker.flatten.reader import BlobLocator, cache_locator


def cache_layers(cache_dir: Path, layers: list[Layer]) -> tuple[list[LayerIndex], BlobLocator]:
    """Store ``layers``' blobs under ``cache_dir/sha256/`` and index them."""
    out = []
    (cache_dir / "sha256").mkdir(parents=True, exist_ok=True)
    for layer in layers:
        hexd = layer.digest.split(":", 1)[1]
        (cache_dir / "sha256" / hexd).write_bytes(layer.blob)
        ti = index_tar_stream([layer.tar], layer=layer.digest)
        out.append(LayerIndex(digest=layer.digest, diff_id=ti.diff_id, media_type="",
                              compression=layer.compression, compressed_size=len(layer.blob),
                              uncompressed_size=ti.uncompressed_size, entries=ti.entries))
    return out, cache_locator(cache_dir)


def local_plan(cache_dir: Path, layers: list[Layer]) -> tuple[FlatPlan, BlobLocator]:
    idx, locate = cache_layers(cache_dir, layers)
    return plan_layers(idx), locate
