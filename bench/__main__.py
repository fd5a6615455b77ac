"""``python -m bench``: rootfs-export against the pipelines users would pick instead.

Builds (once per machine) and pushes the input images into a local ``docker-registry``, runs
every contender on every image for several rounds in alternating order, then the scaling
series, and writes ``bench/results/`` (results.json, RESULTS.md, bench.png) and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import report
from bench.contenders import CONTENDERS, Context, pull_phase, record_output, select
from bench.images import ALL_IMAGES, BenchImage, bench_dir, ensure_built, push
from bench.measure import Phase, RunResult, Scratch, cleanup_workdir, run_checked, run_phases

MAIN_IMAGES = ["a", "b", "c", "d"]
SIZE_SERIES = ["a", "b", "b2x"]
LAYER_SERIES = ["l1", "l4", "l16"]
CONCURRENCY = [1, 2, 4, 8]
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--images", default=",".join(MAIN_IMAGES),
                   help=f"comma list of images for the main table (known: {', '.join(ALL_IMAGES)})"
                        f"; default {','.join(MAIN_IMAGES)}")
    p.add_argument("--contenders", default="all",
                   help="'all', 'ours', 'baseline' or a comma list of: " + ", ".join(CONTENDERS))
    p.add_argument("--rounds", type=int, default=3, help="rounds per image (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: image a only, 1 round, no scaling series")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling series")
    p.add_argument("--scaling-only", action="store_true", help="only the scaling series")
    p.add_argument("--size-series", default=",".join(SIZE_SERIES),
                   help="images for time vs size (default %(default)s)")
    p.add_argument("--layer-series", default=",".join(LAYER_SERIES),
                   help="images for time vs layer count (default %(default)s)")
    p.add_argument("--concurrency-image", default="l16",
                   help="image pulled at concurrency 1, 2, 4, 8 (default %(default)s)")
    p.add_argument("--stream-image", default="l1",
                   help="single-layer image for the one-stream download figure "
                        "(default %(default)s)")
    p.add_argument("--build-only", action="store_true",
                   help="build and push the images, run nothing")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="stop starting new main rounds when the next one (as long as the last) "
                        "and the scaling series (--scaling-reserve) would not fit")
    p.add_argument("--scaling-reserve", type=float, default=8.0, metavar="MINUTES",
                   help="time kept for the scaling series under --budget (default 8)")
    p.add_argument("--profile", action="store_true",
                   help="finish with a py-spy profile of the fastest method on image b")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds one run may take before it is killed (default 900)")
    p.add_argument("--bench-dir", type=Path, default=None,
                   help="image cache and scratch space (default $ROOTFS_EXPORT_BENCH_DIR or "
                        "/var/cache/rootfs-export-bench)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results",
                   help="where results.json, RESULTS.md and bench.png go")
    p.add_argument("--shared-fs", action="store_true",
                   help="work on the bench dir's own file system instead of a private loop-"
                        "mounted scratch fs (peak disk then counts every writer's blocks)")
    p.add_argument("--rootfs-export", default=None,
                   help="the rootfs-export executable (default: the venv's, else PATH)")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.no_scaling = "a", 1, True
        if args.results == REPO / "bench" / "results":
            # Smoke runs never overwrite the committed results.
            args.results = REPO / "bench" / "results" / "quick"
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def _names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


def find_rootfs_export(explicit: str | None) -> str:
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "rootfs-export"
    if beside.exists():
        return str(beside)
    found = shutil.which("rootfs-export")
    if not found:
        raise SystemExit("bench: rootfs-export not found (./scripts/install-python-deps)")
    return found


def check_tools(names: list[str]) -> None:
    need = {"skopeo-umoci": ["skopeo", "umoci", "mkfs.ext4"],
            "lower-bound": ["curl", "pigz", "zstd", "tar", "mkfs.ext4"],
            "lower-bound-tar": ["curl", "pigz", "zstd", "tar"]}
    missing = sorted({t for n in names for t in need.get(n, []) if not shutil.which(t)})
    if missing:
        raise SystemExit(f"bench: missing tools {', '.join(missing)}: run "
                         "./scripts/install-bench-deps")


@contextlib.contextmanager
def registry(base: Path) -> Iterator[Any]:
    """Debian's docker-registry on a free loopback port, storage kept under the bench dir."""
    from tests.support.registry import RegistryProcess

    reg = RegistryProcess(workdir=base / "registry")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def tool_versions(rootfs_export: str) -> dict[str, str]:
    def version(cmd: list[str], pattern: str = r"\d+\.\d+(\.\d+)?") -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "n/a"
        m = re.search(pattern, out.stdout + out.stderr)
        return m.group(0) if m else "n/a"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    return {
        "rootfs-export": f"git {head}",
        "python": platform.python_version(),
        "skopeo": version(["skopeo", "--version"]),
        "umoci": version(["umoci", "--version"]),
        "mke2fs": version(["mke2fs", "-V"]),
        "tar": version(["tar", "--version"]),
        "pigz": version(["pigz", "--version"]),
        "zstd": version(["zstd", "--version"]),
        "curl": version(["curl", "--version"]),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "cpu": _cpu_model(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "n/a"


class Bench:
    def __init__(self, args: argparse.Namespace, ctx: Context, images: dict[str, BenchImage],
                 out: Path) -> None:
        self.args = args
        self.ctx = ctx
        self.images = images
        self.out = out
        self.runs: list[RunResult] = []
        self.t0 = time.monotonic()
        self.rounds_done = 0
        self.scaling: list[dict[str, Any]] = []

    # -- one run -----------------------------------------------------------------------------
    def run(self, image: BenchImage, name: str, rnd: int, series: str = "main") -> RunResult:
        contender = CONTENDERS[name]
        work = self.ctx.work_root / f"{image.name}-{name}"
        phases = contender.build(self.ctx, image, work)

        def done(result: RunResult) -> None:
            record_output(result, work)
            if contender.parse:
                out_size = result.output_size
                contender.parse(result)
                result.output_size = out_size or result.output_size

        result = run_phases(image.name, name, rnd, phases, work, timeout=self.args.timeout,
                            on_success=done)
        result.extra["series"] = series
        status = "ok" if result.ok else f"FAILED: {result.error.splitlines()[0][:160]}"
        print(f"  [{series} r{rnd}] {image.name:4s} {name:16s} {result.wall:8.2f}s "
              f"rss {result.peak_rss / 2**20:7.1f} MiB disk {result.peak_disk / 2**20:8.1f} MiB "
              f"{status}", flush=True)
        self.runs.append(result)
        self.save()
        return result

    def warm(self, image: BenchImage) -> None:
        """Fill the persistent warm cache for ``image`` (untimed)."""
        cache = self.ctx.warm_cache(image)
        phase = pull_phase(self.ctx, image, cache, 4)
        try:
            run_checked(list(phase.cmd or []), timeout=self.args.timeout)
        except Exception as exc:  # noqa: BLE001 - ours-warm then fails on its own, reported
            print(f"  warm cache for {image.name} failed: {str(exc).splitlines()[0]}", flush=True)

    # -- the main table ----------------------------------------------------------------------
    def main_rounds(self, names: list[str], contenders: list[str]) -> None:
        if "ours-warm" in contenders:
            for n in names:
                self.warm(self.images[n])
        reserve = self.args.scaling_reserve * 60 if not self.args.no_scaling else 0.0
        last = 0.0
        for rnd in range(1, self.args.rounds + 1):
            if self.args.budget and rnd > 1:
                spent = time.monotonic() - self.t0
                if spent + last + reserve > self.args.budget * 60:
                    print(f"bench: stopping after {rnd - 1} round(s): another one "
                          f"({last / 60:.1f} min) would overrun --budget", flush=True)
                    self.rounds_done = rnd - 1
                    break
            t_round = time.monotonic()
            self.rounds_done = rnd
            print(f"bench: round {rnd}/{self.args.rounds}", flush=True)
            for i, n in enumerate(names):
                # Alternate: each round (and each image) starts at a different contender.
                shift = (rnd - 1 + i) % len(contenders)
                for name in contenders[shift:] + contenders[:shift]:
                    self.run(self.images[n], name, rnd)
            last = time.monotonic() - t_round

    # -- scaling -----------------------------------------------------------------------------
    def scaling_series(self, ours: str) -> None:
        print("bench: scaling series", flush=True)
        for series, names in (("size", _names(self.args.size_series)),
                              ("layers", _names(self.args.layer_series))):
            for n in names:
                for name in (ours, "lower-bound"):
                    done = [r for r in self.runs if r.image == n and r.contender == name
                            and r.extra.get("series") == "main" and r.ok]
                    if done:
                        # Measured in the main rounds already: the scaling table takes those.
                        for r in done:
                            copy = RunResult(**{k: getattr(r, k) for k in r.__slots__})
                            copy.extra = dict(r.extra, series=series, reused=True)
                            self.runs.append(copy)
                        continue
                    self.run(self.images[n], name, 1, series=series)
        # Download throughput vs concurrency: `rootfs-export pull` into a fresh cache.
        img = self.images[self.args.concurrency_image]
        for conc in CONCURRENCY:
            work = self.ctx.work_root / f"pull-{conc}"
            res = run_phases(img.name, f"pull-c{conc}", 1,
                             [pull_phase(self.ctx, img, work / "cache", conc)], work,
                             timeout=self.args.timeout)
            res.extra.update(series="concurrency", concurrency=conc)
            self.runs.append(res)
            print(f"  [concurrency] pull -c {conc}: {res.wall:.2f}s "
                  f"{img.compressed_bytes / max(res.wall, 1e-9) / 1e6:.0f} MB/s "
                  f"{'ok' if res.ok else 'FAILED: ' + res.error.splitlines()[0][:160]}",
                  flush=True)
        # One stream: a single-layer image, pulled alone, against curl of the same blob.
        # `pull --json` says when the layer's download (network, blob digest, temp file) was
        # done and when inflate + index were: the first gives the download rate, the wall
        # time the full pull (process start and resolving included).
        one = self.images[self.args.stream_image]
        work = self.ctx.work_root / "single"
        pull = Phase("pull", [self.ctx.rootfs_export, "pull", self.ctx.ref(one), "--cache-dir",
                              str(work / "cache"), "--concurrency", "1", "--json"],
                     capture=True)
        curl = Phase("download", ["curl", "-sf", "-o", str(work / "blob"),
                                  f"http://{self.ctx.registry_host}/v2/{one.repo}"
                                  f"/blobs/{one.layers[0].digest}"])
        for label, phase in (("pull-single", pull), ("curl-single", curl)):
            res = run_phases(one.name, label, 1, [phase], work, timeout=self.args.timeout)
            res.extra.update(series="stream")
            if res.ok and label == "pull-single":
                res.extra.update(stream_timings(res.stdout.get("pull", "")))
            self.runs.append(res)
            rates = f"{one.compressed_bytes / max(res.wall, 1e-9) / 1e6:.0f} MB/s"
            if "download_seconds" in res.extra:
                rates = (f"download (hash+write) {one.compressed_bytes / max(res.extra['download_seconds'], 1e-9) / 1e6:.0f}"  # noqa: E501
                         f" MB/s, full pull {rates}")
            print(f"  [stream] {label}: {res.wall:.2f}s {rates} "
                  f"{'ok' if res.ok else 'FAILED: ' + res.error.splitlines()[0][:160]}",
                  flush=True)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "started": self.started, "versions": self.versions,
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "rounds_done": self.rounds_done,
            "images": {n: {"description": i.description, "layers": len(i.layers),
                           "compression": i.compression, "compressed_bytes": i.compressed_bytes,
                           "uncompressed_bytes": i.uncompressed_bytes,
                           "largest_layer": i.largest_layer, "entries": i.entries,
                           "tree_bytes": i.tree_bytes} for n, i in self.images.items()},
            "runs": [r.to_dict() for r in self.runs],
        }
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.rename(self.out / "results.json")

    started = ""
    versions: dict[str, str] = {}


def stream_timings(pull_json: str) -> dict[str, float]:
    """The one layer's download and index seconds from ``rootfs-export pull --json``."""
    try:
        doc = json.loads(pull_json)
        (layer,) = doc["layers"]
        return {"download_seconds": float(layer["download_seconds"]),
                "index_seconds": float(layer["index_seconds"]),
                "pull_seconds": float(doc["seconds"])}
    except (ValueError, KeyError, TypeError):
        return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: note: not root; ours-mount and the root-owned trees of the C pipelines "
              "need root and will fail", file=sys.stderr)
    base = args.bench_dir or bench_dir()
    os.environ["ROOTFS_EXPORT_BENCH_DIR"] = str(base)
    names = _names(args.images)
    series = _names(args.size_series) + _names(args.layer_series) + [
        args.concurrency_image, args.stream_image]
    unknown = [n for n in names + series if n not in ALL_IMAGES]
    if unknown:
        raise SystemExit(f"bench: unknown image(s) {', '.join(unknown)}; known: "
                         f"{', '.join(ALL_IMAGES)}")
    try:
        contenders = select(args.contenders)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    check_tools(contenders)
    rootfs_export = find_rootfs_export(args.rootfs_export)
    scaling = not args.no_scaling
    wanted = [] if args.scaling_only else list(names)
    if scaling:
        wanted += [n for n in series if n not in wanted]
    images = {n: ensure_built(n, base) for n in wanted}

    warm_root = base / "warm"
    cleanup_workdir(warm_root)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    private = not args.shared_fs and os.geteuid() == 0 and not args.build_only
    with registry(base) as reg, (Scratch(base) if private else contextlib.nullcontext(base)) as fs:
        work_root = Path(fs) / "work"
        cleanup_workdir(work_root)
        for img in images.values():
            img.reference = push(img, reg.url, reg.host)
        print(f"bench: registry {reg.url}, images: "
              + ", ".join(f"{n} ({len(i.layers)} layers, {i.compressed_bytes / 1e6:.0f} MB)"
                          for n, i in images.items()), flush=True)
        if args.build_only:
            return 0
        ctx = Context(registry_host=reg.host, rootfs_export=rootfs_export,
                      work_root=work_root, warm_root=warm_root)
        bench = Bench(args, ctx, images, args.results)
        bench.started = started
        bench.versions = tool_versions(rootfs_export)
        try:
            if not args.scaling_only:
                bench.main_rounds(names, contenders)
            if scaling:
                bench.scaling_series(report.default_ours(bench.runs))
        finally:
            cleanup_workdir(work_root)
            cleanup_workdir(warm_root)
            bench.save()
    if args.profile and not args.build_only:
        from bench import profile

        method = report.default_ours(bench.runs).removeprefix("ours-")
        try:
            profile.main(["--image", "b", "--method", method, "--results", str(args.results)])
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - the tables matter more
            print(f"bench: profile failed: {exc}", flush=True)
    elapsed = time.monotonic() - t0
    doc = json.loads((args.results / "results.json").read_text())
    doc["elapsed"] = elapsed
    (args.results / "results.json").write_text(json.dumps(doc, indent=1))
    md, summary = report.render(doc, elapsed, args.results)
    (args.results / "RESULTS.md").write_text(md)
    report.chart(doc, args.results / "bench.png")
    print(summary)
    print(f"bench: wrote {args.results}/RESULTS.md, bench.png, results.json "
          f"({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
