"""The one progress event type, used by the CLI bar, Celery task state and the API."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    RESOLVE = "resolve"
    DOWNLOAD = "download"
    APPLY = "apply"
    PACKAGE = "package"
    CHECK = "check"
    DONE = "done"


class LayerState(StrEnum):
    WAITING = "waiting"
    DOWNLOADING = "downloading"
    CACHED = "cached"
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LayerProgress:
    digest: str
    state: LayerState = LayerState.WAITING
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """A snapshot of a job's progress. Immutable: reporters build a new one per update."""

    phase: Phase
    bytes_done: int = 0
    bytes_total: int = 0
    layers_done: int = 0
    layers_total: int = 0
    layers: tuple[LayerProgress, ...] = field(default_factory=tuple)
    message: str = ""

    def with_(self, **changes: Any) -> ProgressEvent:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (Celery meta, API responses)."""
        d = asdict(self)
        d["phase"] = str(self.phase)
        d["layers"] = [dict(asdict(lp), state=str(lp.state)) for lp in self.layers]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProgressEvent:
        layers = tuple(LayerProgress(digest=lp["digest"], state=LayerState(lp["state"]),
                                     bytes_done=lp["bytes_done"], bytes_total=lp["bytes_total"])
                       for lp in data.get("layers", ()))
        return cls(phase=Phase(data["phase"]), bytes_done=data.get("bytes_done", 0),
                   bytes_total=data.get("bytes_total", 0), layers_done=data.get("layers_done", 0),
                   layers_total=data.get("layers_total", 0), layers=layers,
                   message=data.get("message", ""))


#: a callback receiving progress snapshots; must be cheap and thread-safe
ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(_event: ProgressEvent) -> None:
    """A ProgressCallback that ignores events."""
