"""The rich progress bars of the commands: shown while the work runs, fed progress events."""

from __future__ import annotations

import threading
from typing import Any, Self


class RichBar:
    """A ``rich.progress.Progress`` with ``columns`` on ``console``, shown inside ``with``.

    Subclasses turn each :class:`~worker.progress.ProgressEvent` into updates of
    ``self.progress`` while holding ``self.lock``: events come from several download threads.
    """

    def __init__(self, *columns: Any, console: Any) -> None:
        from rich.progress import Progress

        self.progress = Progress(*columns, console=console, transient=False)
        self.lock = threading.Lock()

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
