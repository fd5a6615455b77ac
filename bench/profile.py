"""Where rootfs-export's time goes: py-spy over one cold export, summarised by function.

``python -m bench.profile --image b [--method stream] [--format ext4]`` starts the registry,
runs ``py-spy record --native --subprocesses`` around ``rootfs-export export`` with an empty
cache, and writes ``bench/results/profile-<image>-<method>.txt``: the CPU samples of every
Python thread by leaf function (self) and by function anywhere on the stack (inclusive), with
native frames (zlib/isal inflate, sha256, the kernel's read/write) kept, so the split between
Python overhead and work done in C is visible. The collapsed stacks (flamegraph input) go to
``profile-<image>-<method>.collapsed`` beside it (not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.images import bench_dir, ensure_built, push
from bench.measure import Scratch, cleanup_workdir

REPO = Path(__file__).resolve().parent.parent


# Frames that mean "this thread is waiting": py-spy's --native mode still samples threads
# blocked in a lock or condition wait (the unsymbolised libc futex frame hides the idle state),
# so such stacks are dropped before anything is counted as CPU.
WAITING = ("Condition.wait (", "Event.wait (", "Thread.join (", "_wait_for_tstate_lock (",
           "lock_PyThread_acquire_lock", "PyThread_acquire_lock_timed", "Queue.get (",
           "epoll_wait", "select (")


def summarise(collapsed: Path, top: int = 30) -> str:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    by_ours: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    total = waiting = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        if any(w in stack for w in WAITING):
            waiting += n
            continue
        frames = [_short(f) for f in stack.split(";")]
        # py-spy puts "process PID:..." and "thread (...)" frames first with --subprocesses.
        head = [f for f in frames if f.startswith(("process ", "thread "))]
        body = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not body:
            continue
        total += n
        by_thread[" / ".join(head) or "main"] += n
        self_c[body[-1]] += n
        by_module[_module(body[-1])] += n
        ours = [f for f in body if "(worker/" in f]
        by_ours[ours[-1] if ours else "(outside worker/: interpreter, threads, imports)"] += n
        for f in set(body):
            incl[f] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} CPU samples; {waiting} more samples of threads waiting on a lock, event or "
             "poll were dropped", "",
             "by process / thread:"]
    lines += [f"  {n * 100 / total:5.1f}%  {k}" for k, n in by_thread.most_common(12)]
    lines += ["", "by module of the frame on top of the stack (where the CPU actually is):"]
    lines += [f"  {n * 100 / total:5.1f}%  {k}" for k, n in by_module.most_common(15)]
    lines += ["", "by the innermost rootfs-export function on the stack (its own code plus the "
              "library and C calls it makes):"]
    lines += [f"  {n * 100 / total:5.1f}%  {k}" for k, n in by_ours.most_common(20)]
    lines += ["", f"top {top} by self time (the frame on top of the stack):"]
    lines += [f"  {n * 100 / total:5.1f}%  {k}" for k, n in self_c.most_common(top)]
    lines += ["", f"top {top} by inclusive time (anywhere on the stack):"]
    lines += [f"  {n * 100 / total:5.1f}%  {k}" for k, n in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def _timings(result: str) -> str:
    import json

    try:
        return json.dumps(json.loads(result).get("timings", {}))
    except (json.JSONDecodeError, AttributeError):
        return result[:300]


def _module(frame: str) -> str:
    m = re.search(r"\(([^()]*)\)$", frame)
    return m.group(1) if m else frame


def _short(frame: str) -> str:
    # "func (/long/path/to/worker/flatten/tar.py:123)" -> "func (worker/flatten/tar.py:123)";
    # line numbers dropped so one function is one row.
    frame = re.sub(r":\d+\)$", ")", frame)
    # Unsymbolised native addresses: one row per library (libc's are mostly memcpy/memmove).
    frame = re.sub(r"^0x[0-9a-f]+ \((.*)\)$", r"[unsymbolised] (\1)", frame)
    frame = re.sub(r"\(.*?/site-packages/", "(", frame)
    frame = re.sub(r"\(/usr/lib/python3[.\d]*/", "(stdlib/", frame)
    return re.sub(r"\(" + re.escape(str(REPO)) + "/", "(", frame)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--image", default="b")
    p.add_argument("--method", default="auto", help="ext4 method (auto, stream, mount, dir)")
    p.add_argument("--format", default="ext4", choices=["ext4", "tar", "dir"])
    p.add_argument("--rate", type=int, default=100, help="samples per second")
    p.add_argument("--no-native", action="store_true", help="Python frames only")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("bench.profile: py-spy not found (./scripts/install-bench-deps)")
    rootfs_export = str(Path(sys.executable).parent / "rootfs-export")
    base = bench_dir()
    image = ensure_built(args.image, base)
    from tests.support.registry import RegistryProcess

    tag = f"{args.image}-{args.format if args.format != 'ext4' else args.method}"
    args.results.mkdir(parents=True, exist_ok=True)
    collapsed = args.results / f"profile-{tag}.collapsed"
    scratch = Scratch(base) if os.geteuid() == 0 else contextlib.nullcontext(base)
    with RegistryProcess(workdir=base / "registry") as reg, scratch as fs:
        ref = push(image, reg.url, reg.host)
        work = Path(fs) / "work" / "profile"
        cleanup_workdir(work)
        work.mkdir(parents=True)
        out = work / ("out.tar" if args.format == "tar" else "out.img")
        cmd = [spy, "record", "--subprocesses", "--rate", str(args.rate), "--format", "raw",
               "-o", str(collapsed)]
        if not args.no_native:
            cmd.append("--native")
        cmd += ["--", rootfs_export, "export", ref, "-o", str(out), "--format", args.format,
                "--cache-dir", str(work / "cache"), "--json"]
        if args.format == "ext4":
            cmd += ["--ext4-method", args.method]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        finally:
            cleanup_workdir(work)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"bench.profile: exit {proc.returncode}")
    result = next((line for line in proc.stdout.splitlines() if line.startswith("{")), "")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    text = (f"py-spy profile of `rootfs-export export` (git {head}) of image {args.image} "
            f"({image.description}), format {args.format}, method {args.method}, cold cache\n"
            f"engine timings (s, slowed by the profiler): {_timings(result)}\n\n"
            + summarise(collapsed))
    (args.results / f"profile-{tag}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
