"""Job-store operations shared by the API and the Celery tasks (SQLAlchemy only, no FastAPI).

Every function runs one short transaction. Rows that several processes race on (a job, a build)
are read ``FOR UPDATE`` on PostgreSQL; on SQLite every transaction takes the write lock up front
(see :func:`api.db.make_engine`), which serialises them the same way.

State rules:

- a job is ``queued`` until its resolve task starts, then ``running``; it is attached to a build
  once its manifest is resolved, and receives the build's outcome in the same transaction that
  ends the build;
- a build is never restarted: a failed, canceled or vanished build is *retired* (its key freed)
  and a new build row takes its place, so a late task of the old one can never touch the new
  one's output.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TASK_DONE,
    TASK_LOST,
    TASK_STARTED,
    TERMINAL,
    Build,
    BuildTask,
    Export,
    session_scope,
    utcnow,
)

#: a build whose worker vanished is relaunched this many times in all before the job fails
MAX_BUILD_ATTEMPTS = 3
#: likewise for a job whose resolve task's worker vanished
MAX_RESOLVE_ATTEMPTS = 3
#: a build none of whose tasks started for this many stale periods fails (no worker consumes
#: its queue: a node name nobody serves, or every worker gone)
IDLE_STALE_PERIODS = 12


def new_id() -> str:
    return uuid.uuid4().hex


def build_key(manifest_digest: str, fmt: str, node: str, options: dict[str, Any]) -> str:
    """The coalescing key: identical manifest, format, node and options give the same artifact."""
    canon = json.dumps({"v": 1, "manifest": manifest_digest, "format": fmt, "node": node,
                        "options": options}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


# -- jobs --------------------------------------------------------------------------------------

def create_job(url: str, *, image: str, platform: str | None, fmt: str, node: str,
               options: dict[str, Any]) -> Export:
    now = utcnow()
    job = Export(id=new_id(), image=image, platform=platform, format=fmt, node=node,
                 options=options, status=QUEUED, phase=None, error=None, result=None,
                 manifest_digest=None, build_id=None, reused=False, resolve_task_id=None,
                 resolve_attempts=0, created_at=now, updated_at=now)
    with session_scope(url) as s:
        s.add(job)
    return job


def set_resolve_task(url: str, job_id: str, task_id: str) -> None:
    with session_scope(url) as s:
        s.execute(update(Export).where(Export.id == job_id)
                  .values(resolve_task_id=task_id, resolve_attempts=Export.resolve_attempts + 1))


def job_view(session: Session, job: Export) -> dict[str, Any]:
    """The API's JSON for ``job``: its own state once terminal, its build's while running."""
    phase, progress = job.phase, None
    build = session.get(Build, job.build_id) if job.build_id else None
    heartbeat = None
    if job.status not in TERMINAL:
        by = (BuildTask.build_id == job.build_id) if job.build_id else (BuildTask.job_id == job.id)
        heartbeat = session.execute(select(func.max(BuildTask.heartbeat_at)).where(by)
                                    ).scalar_one_or_none()
        if heartbeat is not None and heartbeat.tzinfo is None:   # SQLite's aggregate: naive UTC
            heartbeat = heartbeat.replace(tzinfo=dt.UTC)
    if build is not None and job.status not in TERMINAL:
        phase, progress = build.phase, build.progress
    elif build is not None and job.status == SUCCEEDED:
        progress = build.progress
    return {
        "id": job.id,
        "image": job.image,
        "platform": job.platform,
        "format": job.format,
        "node": job.node,
        "options": job.options,
        "status": job.status,
        "phase": phase,
        "progress": progress,
        "result": job.result,
        "error": job.error,
        "manifest_digest": job.manifest_digest,
        "build_id": job.build_id,
        "reused": job.reused,
        "created_at": job.created_at,
        "updated_at": max(job.updated_at, build.updated_at) if build else job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "heartbeat_at": heartbeat,
    }


def get_job(url: str, job_id: str) -> dict[str, Any] | None:
    with session_scope(url, readonly=True) as s:
        job = s.get(Export, job_id)
        return job_view(s, job) if job else None


def list_jobs(url: str, *, status: str | None, limit: int, offset: int
              ) -> tuple[int, list[dict[str, Any]]]:
    with session_scope(url, readonly=True) as s:
        q = select(Export)
        count_q = select(func.count()).select_from(Export)
        if status:
            q = q.where(Export.status == status)
            count_q = count_q.where(Export.status == status)
        total = s.execute(count_q).scalar_one()
        rows = s.execute(q.order_by(Export.created_at.desc(), Export.id)
                         .limit(limit).offset(offset)).scalars().all()
        return total, [job_view(s, j) for j in rows]


def start_resolve(url: str, job_id: str) -> Export | None:
    """Mark the job running (phase resolve); None if it is gone, canceled or already attached."""
    now = utcnow()
    with session_scope(url) as s:
        job = s.get(Export, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL or job.build_id is not None:
            return None
        job.status, job.phase, job.updated_at = RUNNING, "resolve", now
        job.started_at = job.started_at or now
        s.flush()
        s.expunge(job)
        return job


def fail_job(url: str, job_id: str, error: str) -> None:
    """Fail a job that has no build yet (resolve failed)."""
    now = utcnow()
    with session_scope(url) as s:
        s.execute(update(Export).where(Export.id == job_id, Export.status.in_([QUEUED, RUNNING]))
                  .values(status=FAILED, error=error, updated_at=now, finished_at=now))


def job_is_active(url: str, job_id: str) -> bool:
    with session_scope(url, readonly=True) as s:
        job = s.get(Export, job_id)
        return job is not None and job.status not in TERMINAL


@dataclass(frozen=True)
class Attachment:
    """What the resolve task must do after attaching its job to a build."""

    action: str                  # "launch" | "attached" | "reused" | "none"
    build_id: str | None = None


def attach_build(url: str, job_id: str, *, key: str, image: str, manifest_digest: str,
                 node: str, fmt: str, options: dict[str, Any], resolved: dict[str, Any],
                 progress: dict[str, Any],
                 output_exists: Callable[[Build], bool] = lambda _b: True) -> Attachment:
    """Attach the job to the running or finished build for ``key``, or create one.

    ``output_exists`` says whether a succeeded build's artifact is still there (it can only be
    checked on the build's node); a missing one is rebuilt.
    """
    for _ in range(10):
        try:
            return _attach_once(url, job_id, key=key, image=image, manifest_digest=manifest_digest,
                                node=node, fmt=fmt, options=options, resolved=resolved,
                                progress=progress, output_exists=output_exists)
        except IntegrityError:
            continue    # another job created the build for this key first: attach to it
    raise RuntimeError(f"could not attach job {job_id} to a build for key {key}")


def _attach_once(url: str, job_id: str, *, key: str, image: str, manifest_digest: str,
                 node: str, fmt: str, options: dict[str, Any], resolved: dict[str, Any],
                 progress: dict[str, Any], output_exists: Callable[[Build], bool]) -> Attachment:
    now = utcnow()
    with session_scope(url) as s:
        job = s.get(Export, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL:
            return Attachment("none")
        job.manifest_digest, job.updated_at = manifest_digest, now
        build = s.execute(select(Build).where(Build.key == key).with_for_update()
                          ).scalar_one_or_none()
        if build is not None:
            if build.status == RUNNING and not build.cancel_requested:
                job.build_id, job.reused, job.status = build.id, True, RUNNING
                return Attachment("attached", build.id)
            if build.status == SUCCEEDED and output_exists(build):
                job.build_id, job.reused = build.id, True
                job.status, job.phase, job.result = SUCCEEDED, "done", build.result
                job.finished_at = now
                return Attachment("reused", build.id)
            _retire(build, now)
            s.flush()
        build = Build(id=new_id(), key=key, image=image, manifest_digest=manifest_digest,
                      node=node, format=fmt, options=options, resolved=resolved, status=RUNNING,
                      phase="download", progress=progress, result=None, error=None, attempt=1,
                      cancel_requested=False, package_task_id=None, task_ids=[],
                      created_at=now, updated_at=now)
        s.add(build)
        s.flush()
        job.build_id, job.status = build.id, RUNNING
        return Attachment("launch", build.id)


def _retire(build: Build, now: dt.datetime) -> None:
    build.key = f"retired:{build.id}"
    build.updated_at = now
    if build.status == RUNNING:
        build.status, build.finished_at = CANCELED, now


# -- builds --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildInfo:
    id: str
    status: str
    cancel_requested: bool
    attempt: int
    image: str
    node: str
    format: str
    options: dict[str, Any]
    resolved: dict[str, Any]
    manifest_digest: str
    package_task_id: str | None
    task_ids: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status == RUNNING and not self.cancel_requested


def get_build(url: str, build_id: str) -> BuildInfo | None:
    with session_scope(url, readonly=True) as s:
        b = s.get(Build, build_id)
        if b is None:
            return None
        return BuildInfo(id=b.id, status=b.status, cancel_requested=b.cancel_requested,
                         attempt=b.attempt, image=b.image, node=b.node, format=b.format,
                         options=dict(b.options), resolved=dict(b.resolved),
                         manifest_digest=b.manifest_digest, package_task_id=b.package_task_id,
                         task_ids=list(b.task_ids or []))


def build_is_active(url: str, build_id: str) -> bool:
    with session_scope(url, readonly=True) as s:
        row = s.execute(select(Build.status, Build.cancel_requested)
                        .where(Build.id == build_id)).one_or_none()
        return row is not None and row[0] == RUNNING and not row[1]


def set_task_ids(url: str, build_id: str, task_ids: list[str]) -> None:
    with session_scope(url) as s:
        s.execute(update(Build).where(Build.id == build_id)
                  .values(task_ids=task_ids, updated_at=utcnow()))


def update_layer_progress(url: str, build_id: str, layer: int, *, state: str,
                          bytes_done: int, bytes_total: int | None = None) -> None:
    """Fold one layer's download progress into the build's aggregate progress event."""
    with session_scope(url) as s:
        b = s.get(Build, build_id, with_for_update=True)
        if b is None or b.status != RUNNING or not b.progress:
            return
        prog = json.loads(json.dumps(b.progress))
        if prog.get("phase") != "download":
            return      # the package step has taken over the progress
        layers = prog.get("layers") or []
        if not 0 <= layer < len(layers):
            return
        entry = layers[layer]
        entry["state"] = state
        if bytes_total is not None:
            entry["bytes_total"] = bytes_total
        entry["bytes_done"] = max(0, bytes_done)
        prog["bytes_done"] = sum(lp["bytes_done"] for lp in layers)
        prog["bytes_total"] = sum(lp["bytes_total"] for lp in layers)
        prog["layers_done"] = sum(1 for lp in layers if lp["state"] in ("cached", "applied"))
        b.progress, b.updated_at = prog, utcnow()


def set_build_progress(url: str, build_id: str, progress: dict[str, Any]) -> None:
    with session_scope(url) as s:
        s.execute(update(Build).where(Build.id == build_id, Build.status == RUNNING)
                  .values(progress=progress, phase=progress.get("phase"), updated_at=utcnow()))


def claim_package(url: str, build_id: str, task_id: str) -> bool:
    """Only one package task builds an artifact; a redelivery of the same task may resume."""
    with session_scope(url) as s:
        res = s.execute(update(Build).where(
            Build.id == build_id, Build.status == RUNNING, Build.cancel_requested.is_(False),
            (Build.package_task_id.is_(None)) | (Build.package_task_id == task_id),
        ).values(package_task_id=task_id, updated_at=utcnow()))
        return bool(res.rowcount)   # type: ignore[attr-defined]


def finish_build(url: str, build_id: str, status: str, *, result: dict[str, Any] | None = None,
                 error: str | None = None, phase: str | None = None,
                 progress: dict[str, Any] | None = None) -> bool:
    """End a running build and hand its outcome to every job still attached to it.

    Returns False (and changes nothing) if the build had already ended (canceled, failed by a
    sibling task, retired by the stale-job sweep).
    """
    now = utcnow()
    with session_scope(url) as s:
        b = s.get(Build, build_id, with_for_update=True)
        if b is None or b.status != RUNNING:
            return False
        b.status, b.result, b.error, b.updated_at, b.finished_at = status, result, error, now, now
        if phase:
            b.phase = phase
        if progress is not None:
            b.progress = progress
        if status != SUCCEEDED:
            b.key = f"retired:{b.id}"     # a later job for the same key builds afresh
        s.execute(update(Export).where(Export.build_id == build_id,
                                       Export.status.in_([QUEUED, RUNNING]))
                  .values(status=status, result=result, error=error, updated_at=now,
                          finished_at=now, phase=b.phase))
        return True


# -- cancel --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CancelOutcome:
    found: bool
    already: str | None = None          # terminal status the job already had
    revoke: list[str] = field(default_factory=list)


def cancel_job(url: str, job_id: str) -> CancelOutcome:
    """Cancel a job; its build too when no other job still waits for it."""
    now = utcnow()
    with session_scope(url) as s:
        job = s.get(Export, job_id, with_for_update=True)
        if job is None:
            return CancelOutcome(found=False)
        if job.status in TERMINAL:
            return CancelOutcome(found=True, already=job.status)
        job.status, job.error, job.updated_at, job.finished_at = (
            CANCELED, "canceled by request", now, now)
        revoke = [job.resolve_task_id] if job.resolve_task_id else []
        if job.build_id:
            b = s.get(Build, job.build_id, with_for_update=True)
            others = s.execute(select(func.count()).select_from(Export).where(
                Export.build_id == job.build_id, Export.id != job.id,
                Export.status.in_([QUEUED, RUNNING]))).scalar_one()
            if b is not None and b.status == RUNNING and others == 0:
                b.status, b.cancel_requested, b.error = CANCELED, True, "canceled by request"
                b.key, b.updated_at, b.finished_at = f"retired:{b.id}", now, now
                revoke += list(b.task_ids or [])
        return CancelOutcome(found=True, revoke=revoke)


# -- task rows and heartbeats ------------------------------------------------------------------

def task_started(url: str, task_id: str, *, kind: str, job_id: str | None = None,
                 build_id: str | None = None, attempt: int = 1, layer: int | None = None,
                 digest: str | None = None, worker: str | None = None,
                 pid: int | None = None, fresh_seconds: float | None = None,
                 pid_alive: Callable[[int], bool] | None = None) -> int:
    """Record that a task execution starts and return how many times it has been delivered;
    0 if another live execution already runs it.

    The broker may hand a message out again while its first execution still runs (Redis
    redelivers unacknowledged messages after the visibility timeout). A row with a heartbeat
    younger than ``fresh_seconds`` from another worker, or from a process of this worker that
    ``pid_alive`` says still exists, belongs to a live execution: the caller must not run.
    """
    now = utcnow()
    try:
        with session_scope(url) as s:
            row = s.get(BuildTask, task_id, with_for_update=True)
            if row is None:
                s.add(BuildTask(id=task_id, kind=kind, job_id=job_id, build_id=build_id,
                                attempt=attempt, layer=layer, digest=digest, worker=worker,
                                pid=pid, state=TASK_STARTED, deliveries=1, started_at=now,
                                heartbeat_at=now))
                return 1
            if (row.state == TASK_STARTED and fresh_seconds is not None
                    and row.heartbeat_at > now - dt.timedelta(seconds=fresh_seconds)
                    and (row.worker, row.pid) != (worker, pid)):
                other_worker = row.worker != worker
                if other_worker or (row.pid is not None and pid_alive is not None
                                    and pid_alive(row.pid)):
                    return 0
            row.worker, row.pid, row.state = worker, pid, TASK_STARTED
            row.deliveries += 1
            row.heartbeat_at, row.finished_at = now, None
            return row.deliveries
    except IntegrityError:
        return 0     # a concurrent delivery of the same task recorded itself first


def task_heartbeat(url: str, task_id: str) -> None:
    with session_scope(url) as s:
        s.execute(update(BuildTask).where(BuildTask.id == task_id,
                                          BuildTask.state == TASK_STARTED)
                  .values(heartbeat_at=utcnow()))


def task_finished(url: str, task_id: str, state: str = TASK_DONE) -> None:
    now = utcnow()
    with session_scope(url) as s:
        s.execute(update(BuildTask).where(BuildTask.id == task_id)
                  .values(state=state, finished_at=now, heartbeat_at=now))


def build_tasks(url: str, build_id: str) -> list[dict[str, Any]]:
    with session_scope(url, readonly=True) as s:
        rows = s.execute(select(BuildTask).where(BuildTask.build_id == build_id)
                         .order_by(BuildTask.started_at)).scalars().all()
        return [{"id": r.id, "kind": r.kind, "layer": r.layer, "digest": r.digest,
                 "worker": r.worker, "pid": r.pid, "state": r.state, "deliveries": r.deliveries}
                for r in rows]


# -- vanished workers ----------------------------------------------------------------------------

@dataclass
class SweepActions:
    """What the caller must enqueue after a sweep: builds to launch, jobs to resolve again."""

    launch: list[str] = field(default_factory=list)
    resolve: list[tuple[str, str, str | None]] = field(default_factory=list)  # job, image, platf.
    failed: list[str] = field(default_factory=list)


def sweep_stale(url: str, stale_seconds: float) -> SweepActions:
    """Notice tasks whose heartbeat stopped (their worker vanished) and recover their jobs.

    A build is relaunched as a new build row (its layers are cached, so the new attempt mostly
    re-runs the package step) up to MAX_BUILD_ATTEMPTS; after that its jobs fail with an error
    naming the worker. A build created but never launched (its resolve worker died in between)
    is launched.
    """
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=stale_seconds)
    actions = SweepActions()
    with session_scope(url, readonly=True) as s:
        stale = s.execute(select(BuildTask).where(BuildTask.state == TASK_STARTED,
                                                  BuildTask.heartbeat_at < cutoff)
                          ).scalars().all()
        stale_ids = [(t.id, t.kind, t.job_id, t.build_id, t.worker, t.layer, t.digest)
                     for t in stale]
        unlaunched = s.execute(select(Build.id).where(Build.status == RUNNING,
                                                      Build.updated_at < cutoff)
                               ).scalars().all()
        idle_cutoff = now - dt.timedelta(seconds=stale_seconds * IDLE_STALE_PERIODS)
        recent = select(BuildTask.build_id).where(BuildTask.heartbeat_at >= idle_cutoff,
                                                  BuildTask.build_id.is_not(None))
        idle = s.execute(select(Build.id).where(Build.status == RUNNING,
                                                Build.updated_at < idle_cutoff,
                                                Build.id.not_in(recent))).scalars().all()
        never_resolved = s.execute(select(Export.id).where(
            Export.status == QUEUED, Export.build_id.is_(None),
            Export.updated_at < idle_cutoff)).scalars().all()
    for task_id, kind, job_id, build_id, worker, _layer, digest in stale_ids:
        with session_scope(url) as s:
            won = s.execute(update(BuildTask).where(
                BuildTask.id == task_id, BuildTask.state == TASK_STARTED,
                BuildTask.heartbeat_at < cutoff).values(state=TASK_LOST, finished_at=now))
            if not won.rowcount:   # type: ignore[attr-defined]
                continue
            what = f"{kind} task" + (f" for layer {digest}" if digest else "")
            reason = (f"worker {worker or '?'} vanished while running the {what} "
                      f"(no heartbeat for {int(stale_seconds)} s)")
            if kind == "resolve" and job_id:
                _recover_resolve(s, job_id, reason, now, actions)
            elif build_id:
                _recover_build(s, build_id, reason, now, actions)
    for build_id in unlaunched:
        with session_scope(url) as s:
            b = s.get(Build, build_id, with_for_update=True)
            if b is not None and b.status == RUNNING and not b.task_ids and b.updated_at < cutoff:
                b.updated_at = now
                actions.launch.append(b.id)
    for build_id in idle:
        if build_id in actions.launch:
            continue
        waited = int(stale_seconds * IDLE_STALE_PERIODS)
        with session_scope(url) as s:
            b = s.get(Build, build_id, with_for_update=True)
            if b is None or b.status != RUNNING or b.updated_at >= idle_cutoff:
                continue
            reason = (f"no worker ran this export's tasks for {waited} s: is a worker "
                      f"consuming the queues fetch and package.{b.node}?")
            b.status, b.error, b.updated_at, b.finished_at = FAILED, reason, now, now
            b.key = f"retired:{b.id}"
            s.execute(update(Export).where(Export.build_id == b.id,
                                           Export.status.in_([QUEUED, RUNNING]))
                      .values(status=FAILED, error=reason, updated_at=now, finished_at=now))
            actions.failed.append(b.id)
    for job_id in never_resolved:
        waited = int(stale_seconds * IDLE_STALE_PERIODS)
        reason = (f"no worker took this export for {waited} s: is a worker consuming the "
                  "queue fetch?")
        with session_scope(url) as s:
            s.execute(update(Export).where(Export.id == job_id, Export.status == QUEUED,
                                           Export.build_id.is_(None),
                                           Export.updated_at < idle_cutoff)
                      .values(status=FAILED, error=reason, updated_at=now, finished_at=now))
        actions.failed.append(job_id)
    return actions


def _recover_resolve(s: Session, job_id: str, reason: str, now: dt.datetime,
                     actions: SweepActions) -> None:
    job = s.get(Export, job_id, with_for_update=True)
    if job is None or job.status in TERMINAL or job.build_id is not None:
        return
    if job.resolve_attempts >= MAX_RESOLVE_ATTEMPTS:
        job.status, job.error, job.updated_at, job.finished_at = FAILED, reason, now, now
        actions.failed.append(job.id)
        return
    job.status, job.updated_at = QUEUED, now
    actions.resolve.append((job.id, job.image, job.platform))


def _recover_build(s: Session, build_id: str, reason: str, now: dt.datetime,
                   actions: SweepActions) -> None:
    old = s.get(Build, build_id, with_for_update=True)
    if old is None or old.status != RUNNING:
        return
    key = old.key
    old.status, old.error, old.updated_at, old.finished_at = FAILED, reason, now, now
    old.key = f"retired:{old.id}"
    if old.attempt >= MAX_BUILD_ATTEMPTS:
        s.execute(update(Export).where(Export.build_id == old.id,
                                       Export.status.in_([QUEUED, RUNNING]))
                  .values(status=FAILED, error=f"{reason}; gave up after {old.attempt} attempts",
                          updated_at=now, finished_at=now))
        actions.failed.append(old.id)
        return
    s.flush()
    new = Build(id=new_id(), key=key, image=old.image, manifest_digest=old.manifest_digest,
                node=old.node, format=old.format, options=old.options, resolved=old.resolved,
                status=RUNNING, phase="download", progress=_restart_progress(old.progress),
                result=None, error=None, attempt=old.attempt + 1, cancel_requested=False,
                package_task_id=None, task_ids=[], created_at=now, updated_at=now)
    s.add(new)
    s.flush()
    s.execute(update(Export).where(Export.build_id == old.id,
                                   Export.status.in_([QUEUED, RUNNING]))
              .values(build_id=new.id, updated_at=now))
    actions.launch.append(new.id)


def _restart_progress(progress: dict[str, Any] | None) -> dict[str, Any] | None:
    if not progress:
        return progress
    prog = json.loads(json.dumps(progress))
    if prog.get("phase") != "download":
        prog["phase"] = "download"
    prog["message"] = "relaunched after a worker vanished"
    return prog
