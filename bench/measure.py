"""Running one contender: phases as subprocesses with timeouts, sampled RSS and disk, cleanup.

A *run* is a list of phases (each one command, or a Python callable for the trivial steps such
as sizing). While a phase runs, a sampler thread wakes every 50 ms and records

- the resident set size summed over the whole process tree (the phase's process and all its
  descendants: ``mke2fs`` under rootfs-export, ``tar`` and ``pigz`` under a shell pipeline), and
- the extra disk in use on the filesystem that holds the run's work directory, read with
  ``statvfs`` (free blocks against a baseline taken before the run). ``du`` would be exact but
  walking 100k files every 50 ms would steal the CPU we are measuring; the statvfs figure is
  exact when nothing else writes to that filesystem, which is why full runs happen on a quiet
  machine. ext4 counts delayed-allocation blocks as used, so buffered writes show up at once.

Every phase runs in its own session so a timeout kills the whole pipeline; after every run the
work directory is unmounted (anything mounted below it), its loop devices are detached and it
is removed, whether the run succeeded or not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

SAMPLE_INTERVAL = 0.05


class PhaseFailed(RuntimeError):
    """A phase exited non-zero or timed out; the message carries the command and its stderr."""


@dataclass(slots=True)
class Phase:
    """One step of a run. ``cmd`` is an argv list (or a shell string with ``shell=True``); a
    ``func`` runs in this process instead (cheap steps only, e.g. computing a size)."""

    name: str
    cmd: Sequence[str] | str | None = None
    func: Callable[[], Any] | None = None
    shell: bool = False
    env: dict[str, str] | None = None
    capture: bool = False          # keep stdout (e.g. rootfs-export --json)
    cwd: str | None = None


@dataclass(slots=True)
class RunResult:
    """The figures of one run of one contender on one image."""

    image: str
    contender: str
    round: int
    ok: bool = False
    error: str = ""
    wall: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    engine_timings: dict[str, float] = field(default_factory=dict)   # rootfs-export --json
    peak_rss: int = 0
    peak_disk: int = 0
    final_disk: int = 0
    output_size: int = 0
    stdout: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stdout")
        return d


class Sampler:
    """Samples the tree RSS of the current process and disk use of one filesystem."""

    def __init__(self, disk_path: Path) -> None:
        self.disk_path = disk_path
        self.baseline_free = _free_bytes(disk_path)
        self.peak_rss = 0
        self.peak_parts: dict[str, int] = {}
        self.peak_disk = 0
        self._proc: psutil.Process | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def watch(self, pid: int | None) -> None:
        with self._lock:
            try:
                self._proc = psutil.Process(pid) if pid else None
            except psutil.NoSuchProcess:
                self._proc = None

    def sample(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None:
            total, parts = tree_rss(proc)
            if total > self.peak_rss:
                self.peak_rss, self.peak_parts = total, parts
        used = self.baseline_free - _free_bytes(self.disk_path)
        self.peak_disk = max(self.peak_disk, used)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # A vanished process or directory must not end the sampling.
            with contextlib.suppress(Exception):
                self.sample()
            self._stop.wait(SAMPLE_INTERVAL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def tree_rss(proc: psutil.Process) -> tuple[int, dict[str, int]]:
    """Sum of RSS over ``proc`` and all its descendants (processes that exit are skipped),
    and the same split by process name."""
    total = 0
    parts: dict[str, int] = {}
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, parts
    for p in procs:
        try:
            rss = p.memory_info().rss
            name = p.name()
        except psutil.Error:
            continue
        total += rss
        parts[name] = parts.get(name, 0) + rss
    return total, parts


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def run_phases(image: str, contender: str, rnd: int, phases: Sequence[Phase], workdir: Path,
               *, timeout: float, keep_workdir: bool = False,
               on_success: Callable[[RunResult], None] | None = None) -> RunResult:
    """Run ``phases`` in order in a fresh ``workdir``; return the figures. Never raises for a
    failing phase: the error lands in ``RunResult.error`` and the work dir is cleaned up."""
    result = RunResult(image=image, contender=contender, round=rnd)
    cleanup_workdir(workdir)
    workdir.mkdir(parents=True)
    # Commit the blocks freed by the previous run's clean-up, or they come back mid-run and
    # hide this run's growth.
    subprocess.run(["sync", "-f", str(workdir)], capture_output=True, timeout=300)
    sampler = Sampler(workdir).start()
    deadline = time.monotonic() + timeout
    t_start = time.perf_counter()
    try:
        for phase in phases:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PhaseFailed(f"{contender}: run exceeded {timeout:.0f}s before {phase.name}")
            t0 = time.perf_counter()
            if phase.func is not None:
                phase.func()
            else:
                out = _run_cmd(phase, sampler, remaining)
                if phase.capture:
                    result.stdout[phase.name] = out
            result.phases[phase.name] = result.phases.get(phase.name, 0.0) + (
                time.perf_counter() - t0)
        result.wall = time.perf_counter() - t_start
        sampler.sample()
        result.final_disk = max(0, sampler.baseline_free - _free_bytes(workdir))
        result.ok = True
        if on_success is not None:
            on_success(result)
    except Exception as exc:  # noqa: BLE001 - one failing contender must not end the benchmark
        result.ok = False
        result.error = str(exc)[-2000:]
        result.wall = time.perf_counter() - t_start
    finally:
        sampler.stop()
        result.peak_rss = sampler.peak_rss
        result.extra["peak_rss_by_process"] = sampler.peak_parts
        result.peak_disk = max(sampler.peak_disk, result.final_disk)
        if not keep_workdir:
            cleanup_workdir(workdir)
    return result


def _run_cmd(phase: Phase, sampler: Sampler, timeout: float) -> str:
    env = dict(os.environ)
    if phase.env:
        env.update(phase.env)
    proc = subprocess.Popen(
        phase.cmd,  # type: ignore[arg-type]
        shell=phase.shell, executable="/bin/bash" if phase.shell else None,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=phase.cwd, start_new_session=True,
    )
    sampler.watch(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise PhaseFailed(f"{phase.name}: timed out after {timeout:.0f}s: {_show(phase.cmd)}\n"
                          f"{err.decode(errors='replace')[-1500:]}") from None
    except BaseException:
        kill_group(proc)
        raise
    finally:
        sampler.sample()
        sampler.watch(None)
    if proc.returncode != 0:
        raise PhaseFailed(f"{phase.name}: exit {proc.returncode}: {_show(phase.cmd)}\n"
                          f"{err.decode(errors='replace')[-1500:]}")
    return out.decode(errors="replace")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group a phase runs in (its pipeline, its children)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _show(cmd: Sequence[str] | str | None) -> str:
    return cmd if isinstance(cmd, str) else " ".join(cmd or ())


def run_checked(cmd: Sequence[str], *, timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` with a timeout and check, stderr in the error (setup steps)."""
    try:
        return subprocess.run(cmd, check=True, timeout=timeout, capture_output=True, **kw)
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise PhaseFailed(f"exit {exc.returncode}: {' '.join(cmd)}\n{(err or '')[-1500:]}") from None


# -- cleanup ---------------------------------------------------------------------------------

def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == root or mnt.startswith(root + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def loops_under(path: Path) -> list[str]:
    """Loop devices whose backing file lies below ``path``."""
    root = os.path.realpath(path)
    try:
        out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    devs = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            back = parts[1].strip().removesuffix(" (deleted)")
            if back == root or back.startswith(root + "/"):
                devs.append(parts[0])
    return devs


def cleanup_workdir(workdir: Path) -> None:
    """Unmount everything below ``workdir``, detach its loop devices, remove it."""
    if not workdir.exists():
        return
    for mnt in mounts_under(workdir):
        subprocess.run(["umount", mnt], capture_output=True, timeout=60)
        if mnt in mounts_under(workdir):
            subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=60)
    for dev in loops_under(workdir):
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
    shutil.rmtree(workdir, ignore_errors=True)
    if workdir.exists():
        # Read-only dirs inside an unpacked rootfs: make them writable and try again.
        subprocess.run(["chmod", "-R", "u+rwx", str(workdir)], capture_output=True, timeout=300)
        shutil.rmtree(workdir, ignore_errors=True)


def dir_size(path: Path) -> tuple[int, int]:
    """(apparent bytes of regular files, entry count) below ``path``, not following links."""
    total = entries = 0
    stack = [str(path)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                entries += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    return total, entries


# -- a private scratch filesystem --------------------------------------------------------------

class Scratch:
    """A loop-mounted ext4 file system for the runs' work dirs, so the sampled disk growth is
    the runs' own and not every other writer's on the machine. Needs root; the image file is
    sparse and removed afterwards."""

    def __init__(self, base: Path, size: str = "40G") -> None:
        self.image = base / "scratch.img"
        self.mountpoint = base / "scratch"
        self.size = size
        self.device = ""

    def release(self) -> None:
        """Unmount and detach (also what a killed earlier run left behind)."""
        if self.mountpoint.exists():
            for mnt in mounts_under(self.mountpoint):
                subprocess.run(["umount", mnt], capture_output=True, timeout=120)
                if mnt in mounts_under(self.mountpoint):
                    subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=60)
        out = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "-j",
                              str(self.image)], capture_output=True, text=True, timeout=30)
        for dev in out.stdout.split():
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60)
        self.image.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        self.release()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        run_checked(["truncate", "-s", self.size, str(self.image)], timeout=60)
        # Inode tables and journal written now: lazy init would write behind the runs' backs.
        run_checked(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                     str(self.image)], timeout=600)
        self.device = run_checked(["losetup", "--find", "--show", "--direct-io=on",
                                   str(self.image)], timeout=60, text=True).stdout.strip()
        try:
            run_checked(["mount", self.device, str(self.mountpoint)], timeout=60)
        except Exception:
            subprocess.run(["losetup", "-d", self.device], capture_output=True, timeout=60)
            raise
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        self.release()
