"""Job-store rules on real SQLite and PostgreSQL: coalescing, reuse, cancel, vanished workers."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy import update

from api import store
from api.db import Build, BuildTask, Export, session_scope

DIGEST = "sha256:" + "ab" * 32
OPTIONS = {"size": None, "headroom": None, "min_free": None, "ext4_method": "auto",
           "label": "rootfs"}


def _job(url: str, image: str = "127.0.0.1:5000/app:1") -> str:
    return store.create_job(url, image=image, platform=None, fmt="ext4", node="a",
                            options=OPTIONS).id


def _attach(url: str, job_id: str, digest: str = DIGEST, **kw: Any) -> store.Attachment:
    key = store.build_key(digest, "ext4", "a", OPTIONS)
    assert store.start_resolve(url, job_id) is not None
    return store.attach_build(url, job_id, key=key, image="127.0.0.1:5000/app:1",
                              manifest_digest=digest, node="a", fmt="ext4", options=OPTIONS,
                              resolved={"layers": []}, progress=_progress(), **kw)


def _job_in_build(url: str) -> tuple[str, str]:
    """A new job attached to a new build: (job id, build id)."""
    j = _job(url)
    build_id = _attach(url, j).build_id
    assert build_id
    return j, build_id


def _progress() -> dict[str, Any]:
    return {"phase": "download", "bytes_done": 0, "bytes_total": 30, "layers_done": 0,
            "layers_total": 2, "message": "",
            "layers": [{"digest": "sha256:1", "state": "waiting", "bytes_done": 0,
                        "bytes_total": 10},
                       {"digest": "sha256:2", "state": "waiting", "bytes_done": 0,
                        "bytes_total": 20}]}


def test_key_depends_on_digest_format_node_and_options() -> None:
    base = store.build_key(DIGEST, "ext4", "a", OPTIONS)
    assert base == store.build_key(DIGEST, "ext4", "a", dict(reversed(OPTIONS.items())))
    assert base != store.build_key("sha256:" + "cd" * 32, "ext4", "a", OPTIONS)
    assert base != store.build_key(DIGEST, "tar", "a", OPTIONS)
    assert base != store.build_key(DIGEST, "ext4", "b", OPTIONS)
    assert base != store.build_key(DIGEST, "ext4", "a", dict(OPTIONS, label="other"))


def test_concurrent_identical_jobs_coalesce_onto_one_build(migrated_db: str) -> None:
    url = migrated_db
    jobs = [_job(url) for _ in range(12)]
    results: dict[str, store.Attachment] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def run(job_id: str) -> None:
        try:
            barrier.wait(timeout=30)
            results[job_id] = _attach(url, job_id)
        except BaseException as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    actions = sorted(a.action for a in results.values())
    assert actions == ["attached"] * 11 + ["launch"]
    assert len({a.build_id for a in results.values()}) == 1
    views = [store.get_job(url, j) for j in jobs]
    assert all(v and v["status"] == "running" and v["phase"] == "download" for v in views)

    build_id = results[jobs[0]].build_id
    assert build_id
    store.update_layer_progress(url, build_id, 1, state="downloading", bytes_done=5)
    view = store.get_job(url, jobs[3])
    assert view and view["progress"]["bytes_done"] == 5
    assert view["progress"]["layers"][1]["state"] == "downloading"

    result = {"output": "/out/x.ext4", "size": 1, "sha256": "00", "config": {}}
    assert store.finish_build(url, build_id, "succeeded", result=result, phase="done")
    assert not store.finish_build(url, build_id, "failed", error="late")   # already ended
    for j in jobs:
        v = store.get_job(url, j)
        assert v and v["status"] == "succeeded" and v["result"] == result, v

    # A later identical job reuses the artifact at once, and says so.
    late = _job(url)
    att = _attach(url, late)
    assert att.action == "reused" and att.build_id == build_id
    v = store.get_job(url, late)
    assert v and v["status"] == "succeeded" and v["reused"] and v["result"] == result
    # ... unless the artifact is gone: then it is built again.
    again = _job(url)
    att = _attach(url, again, output_exists=lambda _b: False)
    assert att.action == "launch" and att.build_id != build_id


def test_failed_build_is_not_reused(migrated_db: str) -> None:
    url = migrated_db
    first = _job(url)
    att = _attach(url, first)
    assert att.build_id
    assert store.finish_build(url, att.build_id, "failed", error="layer x: boom")
    v = store.get_job(url, first)
    assert v and v["status"] == "failed" and v["error"] == "layer x: boom"
    second = _job(url)
    att2 = _attach(url, second)
    assert att2.action == "launch" and att2.build_id != att.build_id


def test_cancel_detaches_a_job_and_cancels_the_build_with_its_last_job(migrated_db: str) -> None:
    url = migrated_db
    a, b = _job(url), _job(url)
    build_id = _attach(url, a).build_id
    assert build_id and _attach(url, b).build_id == build_id
    store.set_task_ids(url, build_id, ["t1", "t2", "t3"])

    out = store.cancel_job(url, a)
    assert out.found and out.already is None and "t1" not in out.revoke
    assert store.build_is_active(url, build_id)      # b still wants it
    v = store.get_job(url, a)
    assert v and v["status"] == "canceled"

    out = store.cancel_job(url, b)
    assert {"t1", "t2", "t3"} <= set(out.revoke)
    assert not store.build_is_active(url, build_id)
    assert store.cancel_job(url, b).already == "canceled"
    assert not store.cancel_job(url, "f" * 32).found
    # The canceled build is not reused: a new identical job builds afresh.
    c = _job(url)
    att = _attach(url, c)
    assert att.action == "launch" and att.build_id != build_id


def test_queued_job_cancel_revokes_its_resolve_task(migrated_db: str) -> None:
    url = migrated_db
    j = _job(url)
    store.set_resolve_task(url, j, "resolve-1")
    out = store.cancel_job(url, j)
    assert out.revoke == ["resolve-1"]
    assert store.start_resolve(url, j) is None     # the task, if it still runs, does nothing


def _age_task(url: str, task_id: str, seconds: float) -> None:
    old = store.utcnow() - dt.timedelta(seconds=seconds)
    with session_scope(url) as s:
        s.execute(update(BuildTask).where(BuildTask.id == task_id).values(heartbeat_at=old))


def test_vanished_worker_relaunches_then_fails(migrated_db: str) -> None:
    url = migrated_db
    j, build_id = _job_in_build(url)
    store.set_task_ids(url, build_id, ["f1", "p1"])
    store.task_started(url, "f1", kind="fetch", build_id=build_id, layer=0,
                       digest="sha256:1", worker="b@host", pid=1)
    store.task_heartbeat(url, "f1")
    beat = (store.get_job(url, j) or {})["heartbeat_at"]
    assert beat is not None and (store.utcnow() - beat).total_seconds() < 30
    assert store.sweep_stale(url, 60).launch == []          # fresh heartbeat: fine
    _age_task(url, "f1", 120)
    actions = store.sweep_stale(url, 60)
    assert len(actions.launch) == 1
    new_build = actions.launch[0]
    assert new_build != build_id
    v = store.get_job(url, j)
    assert v and v["status"] == "running" and v["build_id"] == new_build
    assert store.sweep_stale(url, 60).launch == []          # handled once only
    assert not store.build_is_active(url, build_id)         # late tasks of the old one stop

    # Attempts are bounded: the job fails naming the worker that vanished.
    current = new_build
    for n in range(store.MAX_BUILD_ATTEMPTS - 1):
        store.set_task_ids(url, current, [f"p{n}"])
        store.task_started(url, f"pk{n}", kind="package", build_id=current, worker="a@host")
        _age_task(url, f"pk{n}", 120)
        actions = store.sweep_stale(url, 60)
        if actions.launch:
            current = actions.launch[0]
    v = store.get_job(url, j)
    assert v and v["status"] == "failed", v
    assert "a@host" in v["error"] and "vanished" in v["error"]


def test_build_never_launched_is_launched_by_the_sweep(migrated_db: str) -> None:
    url = migrated_db
    _, build_id = _job_in_build(url)
    old = store.utcnow() - dt.timedelta(seconds=120)
    with session_scope(url) as s:
        s.execute(update(Build).where(Build.id == build_id).values(updated_at=old))
    assert store.sweep_stale(url, 60).launch == [build_id]


def test_vanished_resolve_worker_requeues_the_job(migrated_db: str) -> None:
    url = migrated_db
    j = _job(url)
    store.set_resolve_task(url, j, "r1")
    assert store.start_resolve(url, j)
    store.task_started(url, "r1", kind="resolve", job_id=j, worker="b@host")
    _age_task(url, "r1", 120)
    actions = store.sweep_stale(url, 60)
    assert [r[0] for r in actions.resolve] == [j]
    v = store.get_job(url, j)
    assert v and v["status"] == "queued"


def test_a_live_execution_keeps_its_task(migrated_db: str) -> None:
    """A redelivered message must not start a second run beside a live one."""
    url = migrated_db
    alive = {101: True, 102: False}
    kw: dict[str, Any] = {"kind": "package", "build_id": "b1", "fresh_seconds": 60,
                          "pid_alive": lambda pid: alive.get(pid, False)}
    assert store.task_started(url, "t", worker="a@h", pid=101, **kw) == 1
    assert store.task_started(url, "t", worker="b@h", pid=7, **kw) == 0     # other worker
    alive[101] = False                                  # the pool process was killed
    assert store.task_started(url, "t", worker="a@h", pid=102, **kw) == 2
    rows = store.build_tasks(url, "b1")
    assert rows[0]["pid"] == 102 and rows[0]["deliveries"] == 2
    _age_task(url, "t", 120)                            # its heartbeat stopped long ago
    assert store.task_started(url, "t", worker="b@h", pid=7, **kw) == 3


def test_build_nobody_works_on_fails_eventually(migrated_db: str) -> None:
    url = migrated_db
    j, build_id = _job_in_build(url)
    store.set_task_ids(url, build_id, ["f1", "p1"])
    long_ago = store.utcnow() - dt.timedelta(seconds=60 * store.IDLE_STALE_PERIODS + 10)
    with session_scope(url) as s:
        s.execute(update(Build).where(Build.id == build_id).values(updated_at=long_ago))
    # A task that heartbeats recently keeps it alive (queued behind others is not idle) ...
    store.task_started(url, "p1", kind="package", build_id=build_id, worker="a@h", pid=1)
    assert store.sweep_stale(url, 60).failed == []
    # ... but with no task activity for that long, the job fails saying what to check.
    _age_task(url, "p1", 60 * store.IDLE_STALE_PERIODS + 10)
    store.task_finished(url, "p1")
    _age_task(url, "p1", 60 * store.IDLE_STALE_PERIODS + 10)
    assert store.sweep_stale(url, 60).failed == [build_id]
    v = store.get_job(url, j)
    assert v and v["status"] == "failed" and "package.a" in v["error"], v


def test_job_no_worker_takes_fails_eventually(migrated_db: str) -> None:
    url = migrated_db
    j = _job(url)
    assert store.sweep_stale(url, 60).failed == []
    long_ago = store.utcnow() - dt.timedelta(seconds=60 * store.IDLE_STALE_PERIODS + 10)
    with session_scope(url) as s:
        s.execute(update(Export).where(Export.id == j).values(updated_at=long_ago))
    assert store.sweep_stale(url, 60).failed == [j]
    v = store.get_job(url, j)
    assert v and v["status"] == "failed" and "queue fetch" in v["error"], v
