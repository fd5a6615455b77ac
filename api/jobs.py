"""What the API does with jobs beyond reading rows: submit, cancel, recover vanished workers.

Kept apart from the HTTP layer so the same calls serve the routes, the periodic sweep and tests.
"""

from __future__ import annotations

import logging
from typing import Any

from api import store
from worker.settings import Settings

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """The job was recorded but could not be queued."""


def submit(settings: Settings, *, image: str, platform: str | None, fmt: str, node: str | None,
           options: dict[str, Any]) -> dict[str, Any]:
    """Record a job and send its resolve task; returns the job's view."""
    from worker.tasks import enqueue_resolve

    url = settings.database_url
    job = store.create_job(url, image=image, platform=platform, fmt=fmt,
                           node=node or settings.node, options=options)
    try:
        enqueue_resolve(job.id, image, platform)
    except Exception as exc:
        store.fail_job(url, job.id, f"could not queue the job: broker unavailable ({exc})")
        raise BrokerUnavailable(str(exc)) from exc
    view = store.get_job(url, job.id)
    assert view is not None
    return view


def cancel(settings: Settings, job_id: str) -> store.CancelOutcome:
    """Cancel a job: revoke its queued tasks; running ones stop at their next check."""
    outcome = store.cancel_job(settings.database_url, job_id)
    if outcome.revoke:
        from worker.celery import app

        try:
            app.control.revoke(outcome.revoke)
        except Exception:
            # Tasks also check the job store before and while they run: revoking only saves work.
            log.warning("could not broadcast the revoke of job %s's tasks", job_id, exc_info=True)
    return outcome


def sweep(settings: Settings) -> store.SweepActions:
    """Recover jobs whose worker vanished (see :func:`api.store.sweep_stale`)."""
    from worker.tasks import sweep as task_sweep

    return task_sweep(settings)
