"""Celery tasks: thin wrappers calling the engine's stages and recording progress in the job store.

One export job runs as::

    rootfs_export.resolve(job_id, image, platform)                       queue fetch
      -> chord(group(rootfs_export.fetch_layer(build_id, image, i, digest) ...)   queue fetch
               rootfs_export.package(build_id=, image=, node=))          queue package.<node>

Task arguments name the job or build, the image reference and the layer: never credentials
(workers read those from their own docker config). Each task records its execution in the
``build_tasks`` table and heartbeats there from a watcher thread, which also turns a cancel
(or a build ended by someone else) into the engine's ``cancel`` event.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Task, chord, group

from api import store
from api.db import FAILED, SUCCEEDED, TASK_FAILED, Build
from worker import export
from worker.celery import (
    FETCH_QUEUE,
    TASK_FETCH,
    TASK_PACKAGE,
    TASK_RELAUNCH,
    TASK_RESOLVE,
    app,
    package_queue,
)
from worker.errors import Canceled, RegistryError, RootfsExportError
from worker.progress import LayerProgress, LayerState, Phase, ProgressEvent
from worker.pull.manifest import ResolvedImage
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Celery-level retries of a transient registry failure (the transport already retried)
FETCH_RETRIES = 4
#: deliveries of one task (each ended by its process dying) before the job fails
MAX_DELIVERIES = 3
#: seconds between progress writes to the job store and the result backend
PROGRESS_INTERVAL = 0.5

OUTPUT_SUFFIX = {"ext4": ".ext4", "tar": ".tar", "dir": ".rootfs"}


def output_path(settings: Settings, build_id: str, fmt: str) -> Path:
    """Where a build's artifact lives: the node's output dir and a name derived from the build."""
    return settings.output_dir / f"{build_id}{OUTPUT_SUFFIX[fmt]}"


def _worker_name(task: Task) -> str:
    return str(task.request.hostname or socket.gethostname())


# -- watcher: heartbeat + cancel -------------------------------------------------------------------

class Watcher:
    """Heartbeats the task row and sets ``cancel`` once the build stops being active."""

    def __init__(self, url: str, task_id: str, build_id: str | None, *, stale_seconds: int,
                 job_id: str | None = None) -> None:
        self.url, self.task_id, self.build_id, self.job_id = url, task_id, build_id, job_id
        self.cancel = threading.Event()
        self._stop = threading.Event()
        self._beat = max(0.5, min(30.0, stale_seconds / 5))
        self._poll = min(1.0, self._beat)
        self._thread = threading.Thread(target=self._run, name=f"watch-{task_id[:8]}",
                                        daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self._poll):
            try:
                if self.build_id and not store.build_is_active(self.url, self.build_id):
                    self.cancel.set()
                if self.job_id and not store.job_is_active(self.url, self.job_id):
                    self.cancel.set()
                if time.monotonic() - last_beat >= self._beat:
                    store.task_heartbeat(self.url, self.task_id)
                    last_beat = time.monotonic()
                    log.debug("task %s: heartbeat", self.task_id)
            except Exception:   # a database hiccup must not kill the task; next poll retries
                log.warning("watcher for task %s: database error", self.task_id, exc_info=True)


class Throttle:
    """Calls through at most every ``interval`` seconds, and always when ``force`` is set."""

    def __init__(self, interval: float = PROGRESS_INTERVAL) -> None:
        self.interval = interval
        self._last = 0.0
        self._lock = threading.Lock()

    def ready(self, force: bool = False) -> bool:
        with self._lock:
            now = time.monotonic()
            if force or now - self._last >= self.interval:
                self._last = now
                return True
            return False


def _publish(task: Task, event: ProgressEvent) -> None:
    """The custom PROGRESS state: in the result backend, and as a ``task-progress`` event that
    Flower (which follows events, not the backend) shows as state PROGRESS, the progress event
    as JSON in its result column until the task ends."""
    if task.request.id:
        meta = event.to_dict()
        try:
            task.update_state(state="PROGRESS", meta=meta)
            task.send_event("task-progress", result=json.dumps(meta, separators=(",", ":")))
        except Exception:
            log.warning("could not publish progress of task %s", task.request.id, exc_info=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_row(url: str, task: Task, settings: Settings, **fields: Any) -> str | None:
    """Record this execution; None if a live execution of the same task already runs, or if
    the task has killed its worker process too often (it is then failed, not retried)."""
    task_id = str(task.request.id or uuid.uuid4())
    deliveries = store.task_started(url, task_id, worker=_worker_name(task), pid=os.getpid(),
                                    fresh_seconds=settings.stale_job_seconds,
                                    pid_alive=_pid_alive, **fields)
    if not deliveries:
        return None
    if deliveries > MAX_DELIVERIES:
        # Each delivery died with its process (typically the OOM killer): a poison message.
        what = f"the {fields.get('kind')} task" + (
            f" of layer {fields['digest']}" if fields.get("digest") else "")
        error = (f"{what} was started {deliveries - 1} times and its worker process died each "
                 "time (out of memory?)")
        store.task_finished(url, task_id, TASK_FAILED)
        if fields.get("build_id"):
            store.finish_build(url, fields["build_id"], FAILED, error=error)
        elif fields.get("job_id"):
            store.fail_job(url, fields["job_id"], error)
        return None
    return task_id


# -- launching -----------------------------------------------------------------------------------

def enqueue_resolve(job_id: str, image: str, platform: str | None) -> str:
    """Send a job's first task; returns its task id."""
    settings = get_settings()
    task_id = uuid.uuid4().hex
    store.set_resolve_task(settings.database_url, job_id, task_id)
    # ignore_result: the job store has the outcome, and a sender outside a worker (the API)
    # would otherwise subscribe to every task's result channel.
    resolve_task.apply_async(args=(job_id, image, platform), task_id=task_id, queue=FETCH_QUEUE,
                             ignore_result=True)
    return task_id


def launch_build(build_id: str) -> list[str]:
    """Send a build's chord: one fetch task per layer on ``fetch``, then the package callback."""
    settings = get_settings()
    info = store.get_build(settings.database_url, build_id)
    if info is None or not info.active:
        return []
    resolved = ResolvedImage.from_dict(info.resolved)
    fetch_ids = [uuid.uuid4().hex for _ in resolved.layers]
    package_id = uuid.uuid4().hex
    header = group(
        fetch_layer_task.signature(args=(build_id, info.image, i, layer.digest), task_id=tid,
                                   queue=FETCH_QUEUE, immutable=True)
        for i, (layer, tid) in enumerate(zip(resolved.layers, fetch_ids, strict=True)))
    body = package_task.signature(kwargs={"build_id": build_id, "image": info.image,
                                          "node": info.node},
                                  task_id=package_id, queue=package_queue(info.node))
    if resolved.layers:
        chord(header)(body)
    else:
        body.apply_async(args=([],))
    store.set_task_ids(settings.database_url, build_id, [*fetch_ids, package_id])
    return [*fetch_ids, package_id]


def initial_progress(resolved: ResolvedImage) -> dict[str, Any]:
    layers = tuple(LayerProgress(digest=d.digest, state=LayerState.WAITING, bytes_done=0,
                                 bytes_total=d.size) for d in resolved.layers)
    return ProgressEvent(phase=Phase.DOWNLOAD, bytes_total=sum(d.size for d in resolved.layers),
                         layers_total=len(layers), layers=layers).to_dict()


def _retry_countdown(settings: Settings, retries: int) -> float:
    return min(60.0, max(0.5, settings.retry_backoff) * (2 ** retries))


# -- tasks ----------------------------------------------------------------------------------------

@app.task(name=TASK_RESOLVE, bind=True, max_retries=FETCH_RETRIES)
def resolve_task(self: Task, job_id: str, image: str, platform: str | None) -> dict[str, Any]:
    """Resolve the job's manifest, then attach it to a build (coalescing) or launch one."""
    settings = get_settings()
    url = settings.database_url
    job = store.start_resolve(url, job_id)
    if job is None:
        return {"job": job_id, "skipped": "job is no longer waiting"}
    _publish(self, ProgressEvent(phase=Phase.RESOLVE, message=image))
    task_id = _start_row(url, self, settings, kind="resolve", job_id=job_id)
    if task_id is None:
        return {"job": job_id, "skipped": "already running elsewhere"}
    with Watcher(url, task_id, None, job_id=job_id, stale_seconds=settings.stale_job_seconds):
        try:
            resolved = export.resolve(image, platform, settings)
        except RegistryError as exc:
            if exc.transient and self.request.retries < FETCH_RETRIES:
                store.task_finished(url, task_id, "retry")
                raise self.retry(exc=exc, countdown=_retry_countdown(
                    settings, self.request.retries)) from None
            store.task_finished(url, task_id, TASK_FAILED)
            store.fail_job(url, job_id, str(exc))
            return {"job": job_id, "error": str(exc)}
        except RootfsExportError as exc:
            store.task_finished(url, task_id, TASK_FAILED)
            store.fail_job(url, job_id, str(exc))
            return {"job": job_id, "error": str(exc)}
        except Exception as exc:
            store.task_finished(url, task_id, TASK_FAILED)
            store.fail_job(url, job_id, f"internal error resolving {image}: {exc!r}")
            raise
        options = dict(job.options)
        key = store.build_key(resolved.manifest_digest, job.format, job.node, options)

        def output_exists(build: Build) -> bool:
            # Only the build's own node can see its output; elsewhere trust the record.
            if build.node != settings.node or not build.result:
                return True
            return Path(str(build.result.get("output", ""))).exists()

        attachment = store.attach_build(
            url, job_id, key=key, image=image, manifest_digest=resolved.manifest_digest,
            node=job.node, fmt=job.format, options=options, resolved=resolved.to_dict(),
            progress=initial_progress(resolved), output_exists=output_exists)
        if attachment.action == "launch" and attachment.build_id:
            launch_build(attachment.build_id)
        store.task_finished(url, task_id)
    return {"job": job_id, "manifest_digest": resolved.manifest_digest,
            "build": attachment.build_id, "action": attachment.action}


@app.task(name=TASK_FETCH, bind=True, max_retries=FETCH_RETRIES)
def fetch_layer_task(self: Task, build_id: str, image: str, layer: int,
                     digest: str) -> dict[str, Any]:
    """Download, verify and index one layer into the shared cache (a cached layer is a no-op)."""
    settings = get_settings()
    url = settings.database_url
    info = store.get_build(url, build_id)
    if info is None or not info.active:
        return {"layer": layer, "digest": digest, "skipped": "build is no longer running"}
    resolved = ResolvedImage.from_dict(info.resolved)
    total = len(resolved.layers)
    size = resolved.layers[layer].size
    throttle = Throttle()

    def progress(event: ProgressEvent) -> None:
        done = event.bytes_done
        for lp in event.layers:
            if lp.digest == digest:
                done = lp.bytes_done
        if throttle.ready():
            _publish(self, event)
            try:
                store.update_layer_progress(url, build_id, layer, state="downloading",
                                            bytes_done=done)
            except Exception:
                log.warning("progress write failed for build %s", build_id, exc_info=True)

    task_id = _start_row(url, self, settings, kind="fetch", build_id=build_id,
                         attempt=info.attempt, layer=layer, digest=digest)
    if task_id is None:
        return {"layer": layer, "digest": digest, "skipped": "already running elsewhere"}
    with Watcher(url, task_id, build_id, stale_seconds=settings.stale_job_seconds) as watch:
        try:
            index = export.fetch_layer(resolved, layer, settings, progress=progress,
                                       cancel=watch.cancel)
        except Canceled:
            store.task_finished(url, task_id)
            return {"layer": layer, "digest": digest, "skipped": "canceled"}
        except RegistryError as exc:
            if exc.transient and self.request.retries < FETCH_RETRIES:
                store.task_finished(url, task_id, "retry")
                raise self.retry(exc=exc, countdown=_retry_countdown(
                    settings, self.request.retries)) from None
            _fail_layer(url, task_id, build_id, image, layer, total, digest, exc)
            raise
        except Exception as exc:
            if watch.cancel.is_set() and not store.build_is_active(url, build_id):
                store.task_finished(url, task_id)
                return {"layer": layer, "digest": digest, "skipped": "canceled"}
            _fail_layer(url, task_id, build_id, image, layer, total, digest, exc)
            raise
        store.update_layer_progress(url, build_id, layer, state="cached", bytes_done=size,
                                    bytes_total=size)
        store.task_finished(url, task_id)
    return {"layer": layer, "digest": digest, "diff_id": index.diff_id,
            "compressed_size": index.compressed_size,
            "uncompressed_size": index.uncompressed_size, "entries": len(index.entries),
            "worker": _worker_name(self)}


def _fail_layer(url: str, task_id: str, build_id: str, image: str, layer: int, total: int,
                digest: str, exc: BaseException) -> None:
    store.task_finished(url, task_id, TASK_FAILED)
    what = str(exc) if isinstance(exc, RootfsExportError) else f"internal error: {exc!r}"
    if digest in what:
        message = f"{image}: layer {layer + 1}/{total}: {what}"
    else:
        message = f"{image}: layer {layer + 1}/{total} ({digest}): {what}"
    store.finish_build(url, build_id, FAILED, error=message)


@app.task(name=TASK_PACKAGE, bind=True)
def package_task(self: Task, fetched: list[Any] | None = None, *, build_id: str, image: str,
                 node: str) -> dict[str, Any]:
    """The chord callback: flatten the cached layers and package them on this node."""
    settings = get_settings()
    url = settings.database_url
    if settings.node != node:
        # Routed by queue name; a worker started with another node's queue would write the
        # output where nobody looks for it.
        log.warning("package task for node %s runs on node %s", node, settings.node)
    info = store.get_build(url, build_id)
    if info is None or not info.active:
        return {"build": build_id, "skipped": "build is no longer running"}
    out = output_path(settings, build_id, info.format)
    started = _start_row(url, self, settings, kind="package", build_id=build_id,
                         attempt=info.attempt)
    if started is None:
        if not store.build_is_active(url, build_id):
            _remove_output(out)     # failed as a poison message: leave nothing behind
            return {"build": build_id, "error": "its worker process died too often"}
        return {"build": build_id, "skipped": "already running elsewhere"}
    task_id = started
    if not store.claim_package(url, build_id, task_id):
        store.task_finished(url, task_id)
        return {"build": build_id, "skipped": "another package task owns this build"}
    resolved = ResolvedImage.from_dict(info.resolved)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_output(out)     # a redelivered task starts from scratch
    _remove_abandoned_temporaries(url, out.parent)
    throttle = Throttle()

    def progress(event: ProgressEvent) -> None:
        if throttle.ready():
            _publish(self, event)
            try:
                store.set_build_progress(url, build_id, event.to_dict())
            except Exception:
                log.warning("progress write failed for build %s", build_id, exc_info=True)

    with Watcher(url, task_id, build_id, stale_seconds=settings.stale_job_seconds) as watch:
        log.info("build %s: packaging %s as %s into %s", build_id, image, info.format, out)
        try:
            layers = [export.fetch_layer(resolved, i, settings, cancel=watch.cancel)
                      for i in range(len(resolved.layers))]
            log.info("build %s: %d layers ready in the cache", build_id, len(layers))
            request = export_request(info.image, info.format, info.options, str(out),
                                     platform=str(resolved.platform))
            result = export.build_output(resolved, layers, request, settings,
                                         progress=progress, cancel=watch.cancel)
        except Canceled:
            _remove_output(out)
            store.task_finished(url, task_id)
            return {"build": build_id, "canceled": True}
        except Exception as exc:
            _remove_output(out)
            if watch.cancel.is_set() and not store.build_is_active(url, build_id):
                store.task_finished(url, task_id)
                return {"build": build_id, "canceled": True}
            store.task_finished(url, task_id, TASK_FAILED)
            what = str(exc) if isinstance(exc, RootfsExportError) else f"internal error: {exc!r}"
            store.finish_build(url, build_id, FAILED, error=f"{image}: {what}")
            if isinstance(exc, RootfsExportError):
                return {"build": build_id, "error": what}
            raise
        payload = result_payload(result, node=settings.node)
        total = sum(d.size for d in resolved.layers)
        final = ProgressEvent(
            phase=Phase.DONE, bytes_done=total, bytes_total=total, layers_done=len(layers),
            layers_total=len(layers), message=f"wrote {payload['output']}",
            layers=tuple(LayerProgress(d.digest, LayerState.APPLIED, d.size, d.size)
                         for d in resolved.layers))
        if not store.finish_build(url, build_id, SUCCEEDED, result=payload, phase="done",
                                  progress=final.to_dict()):
            _remove_output(out)     # canceled at the last moment: leave nothing behind
            store.task_finished(url, task_id)
            return {"build": build_id, "canceled": True}
        store.task_finished(url, task_id)
    _publish(self, final)
    return {"build": build_id, "output": payload["output"], "sha256": payload["sha256"]}


def export_request(image: str, fmt: str, options: dict[str, Any], output: str, *,
                   platform: str | None) -> export.ExportRequest:
    """The engine request for a job's stored options."""
    ext4 = export.Ext4Options(
        method=export.Ext4Method(options.get("ext4_method") or "auto"),
        size=options.get("size"),
        headroom=options.get("headroom"),
        min_free=options.get("min_free"),
        label=options.get("label") or "rootfs",
    )
    return export.ExportRequest(image=image, output=output, format=export.OutputFormat(fmt),
                                platform=platform, ext4=ext4)


def result_payload(result: export.ExportResult, *, node: str) -> dict[str, Any]:
    """The job's ``result``: where the artifact is, its size and hash, and the image config."""
    return {
        "output": result.output,
        "node": node,
        "format": str(result.format),
        "size": result.output_size,
        "sha256": result.sha256,
        "manifest_digest": result.manifest_digest,
        "platform": result.platform,
        "config": result.config,
        "counts": dict(result.counts),
        "timings": dict(result.timings),
        "warnings": list(result.warnings),
        "extra": dict(result.extra),
    }


def _remove_output(out: Path) -> None:
    """Remove an output, its sidecar and any engine temporaries beside it (``.NAME.*``)."""
    from worker.flatten.dirout import remove_tree

    for path in (out, out.with_name(out.name + ".json"), *out.parent.glob(f".{out.name}.*")):
        try:
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


@app.task(name=TASK_RELAUNCH, bind=True)
def relaunch_task(self: Task, build_id: str) -> dict[str, Any]:
    """Send a build's chord again (after a worker vanished). Sent by the API's sweep, so that
    chords are only ever built inside workers."""
    return {"build": build_id, "tasks": len(launch_build(build_id))}


_TEMP_NAME = re.compile(r"^\.(?P<build>[0-9a-f]{32})\.")


def _remove_abandoned_temporaries(url: str, output_dir: Path) -> None:
    """Remove engine temporaries (``.BUILD.ext4.*``) of builds no longer running here: what a
    worker killed mid-package left behind before its build was relaunched or failed."""
    try:
        names = [p for p in output_dir.iterdir() if _TEMP_NAME.match(p.name)]
    except OSError:
        return
    ended: dict[str, bool] = {}
    for path in names:
        m = _TEMP_NAME.match(path.name)
        assert m is not None
        build = m.group("build")
        if build not in ended:
            ended[build] = not store.build_is_active(url, build)
        if ended[build]:
            log.info("removing %s, left by an ended build", path)
            if path.is_dir() and not path.is_symlink():
                from worker.flatten.dirout import remove_tree

                remove_tree(path)
            else:
                path.unlink(missing_ok=True)


def sweep(settings: Settings | None = None) -> store.SweepActions:
    """Recover jobs whose worker vanished: relaunch builds, resend resolve tasks."""
    settings = settings or get_settings()
    actions = store.sweep_stale(settings.database_url, settings.stale_job_seconds)
    for build_id in actions.launch:
        log.warning("relaunching build %s: a worker vanished", build_id)
        relaunch_task.apply_async(args=(build_id,), queue=FETCH_QUEUE, ignore_result=True)
    for job_id, image, platform in actions.resolve:
        log.warning("resolving job %s again: a worker vanished", job_id)
        enqueue_resolve(job_id, image, platform)
    return actions


__all__ = ["SUCCEEDED", "app", "enqueue_resolve", "export_request", "fetch_layer_task",
           "launch_build", "output_path", "package_task", "relaunch_task", "resolve_task", "sweep"]
