"""The contenders: each turns one image reference into an output, as a list of phases.

- ``ours-direct``, ``ours-stream``, ``ours-mount``, ``ours-dir``: ``rootfs-export export`` to
  ext4 with an empty cache (cold), one per ext4 method;
- ``ours-warm``: the same with the blobs and indexes already cached (default method);
  ``ours-warm-stream``: warm with the stream method, to compare (both use the warm cache the
  run fills when ``ours-warm`` is selected);
- ``ours-lowdisk``: cold, ``--low-disk`` (for the peak-disk target);
- ``skopeo-umoci``: the dockerless pipeline users run today: ``skopeo copy`` to an OCI layout,
  ``umoci raw unpack``, then ``mkfs.ext4 -d`` on a file sized the way such scripts size it
  (umoci 0.4.7 cannot read zstd layers: for zstd images skopeo recompresses them as gzip);
- ``lower-bound``: C tools only: curl the blobs (in parallel), ``pigz -dc | tar -x`` (or
  ``zstd -dc``) each layer in order into a directory (no whiteout logic), ``mkfs.ext4 -d``;
- ``ours-tar`` / ``lower-bound-tar``: ``--format tar`` against the lower bound ending in
  ``tar -cf`` instead of ``mkfs.ext4``.

The shell sizing used by both C pipelines (``SIZE_AND_MKFS``) is the usual one: apparent bytes
(``du -sb``) x 1.2 plus slack (64 MiB and one 4 KiB block per entry, without which trees of many
tiny files do not fit), and an inode count of entries x 1.2 (the mke2fs default ratio runs out of
inodes on such trees).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.images import BenchImage
from bench.measure import Phase, RunResult

ACCEPT = ("application/vnd.oci.image.manifest.v1+json,"
          "application/vnd.docker.distribution.manifest.v2+json")


@dataclass(slots=True)
class Context:
    """What every contender needs: where the registry is, which binaries, where to work."""

    registry_host: str
    rootfs_export: str                 # path of the rootfs-export console script
    work_root: Path                    # one fresh work dir per run below it
    warm_root: Path                    # persistent warm caches (outside the measured dir)
    python: str = "python3"
    notes: dict[str, str] = field(default_factory=dict)

    def ref(self, image: BenchImage) -> str:
        return f"{self.registry_host}/{image.repo}:{image.tag}"

    def warm_cache(self, image: BenchImage) -> Path:
        return self.warm_root / image.name


@dataclass(slots=True)
class Contender:
    name: str
    label: str
    kind: str                          # "ours" | "baseline"
    output: str                        # "ext4" | "tar"
    build: Callable[[Context, BenchImage, Path], list[Phase]]
    parse: Callable[[RunResult], None] | None = None


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


# -- rootfs-export ------------------------------------------------------------------------------

def _ours(method: str | None, *, warm: bool = False, low_disk: bool = False,
          fmt: str = "ext4") -> Callable[[Context, BenchImage, Path], list[Phase]]:
    def build(ctx: Context, image: BenchImage, work: Path) -> list[Phase]:
        out = work / ("out.tar" if fmt == "tar" else "out.ext4")
        cache = ctx.warm_cache(image) if warm else work / "cache"
        cmd = [ctx.rootfs_export, "export", ctx.ref(image), "-o", str(out), "--format", fmt,
               "--cache-dir", str(cache), "--json"]
        if method:
            cmd += ["--ext4-method", method]
        if low_disk:
            cmd.append("--low-disk")
        return [Phase("export", cmd, capture=True)]
    return build


def parse_ours(result: RunResult) -> None:
    """Take the phase timings, counts and output size from ``rootfs-export --json``."""
    text = result.stdout.get("export", "").strip()
    if not text:
        return
    try:
        doc = json.loads(text.splitlines()[-1] if not text.startswith("{") else text)
    except json.JSONDecodeError:
        result.extra["json_error"] = text[-300:]
        return
    timings = doc.get("timings") or {}
    result.engine_timings = {k: float(v) for k, v in timings.items()
                             if isinstance(v, int | float)}
    result.output_size = int(doc.get("output_size") or 0)
    for key in ("counts", "extra", "warnings"):
        if doc.get(key):
            result.extra[key] = doc[key]


def pull_phase(ctx: Context, image: BenchImage, cache: Path, concurrency: int) -> Phase:
    return Phase("pull", [ctx.rootfs_export, "pull", ctx.ref(image), "--cache-dir", str(cache),
                          "--concurrency", str(concurrency)])


# -- the C pipelines -----------------------------------------------------------------------------

def size_and_mkfs(rootfs: Path, out: Path) -> list[Phase]:
    r, o = _q(rootfs), _q(out)
    size = Phase("size", f"set -eo pipefail; B=$(du -sb {r} | cut -f1); "
                         f"N=$(find {r} -xdev | wc -l); "
                         f"echo $(( B*12/10 + N*4096 + 64*1024*1024 )) $(( N*12/10 + 1024 ))"
                         f" > {r}.size", shell=True)
    mkfs = Phase("mkfs", f"set -eo pipefail; read S N < {r}.size; truncate -s $S {o}; "
                         f"mkfs.ext4 -q -F -N $N -d {r} {o}", shell=True)
    return [size, mkfs]


def skopeo_umoci(ctx: Context, image: BenchImage, work: Path) -> list[Phase]:
    oci, rootfs = work / "oci", work / "rootfs"
    # umoci 0.4.7 refuses zstd layers ("blob is not correct mediatype"), and skopeo 1.9's
    # --dest-decompress leaves zstd as it is: the way round is to have skopeo recompress them
    # as gzip, a cost users of this pipeline pay on every zstd image.
    extra = ["--dest-compress-format", "gzip"] if image.compression == "zstd" else []
    return [
        Phase("copy", ["skopeo", "copy", "--quiet", "--src-tls-verify=false", *extra,
                       f"docker://{ctx.ref(image)}", f"oci:{oci}:bench"]),
        Phase("unpack", ["umoci", "raw", "unpack", "--image", f"{oci}:bench", str(rootfs)]),
        *size_and_mkfs(rootfs, work / "out.ext4"),
    ]


def _lower_bound_fetch(ctx: Context, image: BenchImage, work: Path) -> list[Phase]:
    base = f"http://{ctx.registry_host}/v2/{image.repo}"
    blobs = work / "blobs"
    manifest = work / "manifest.json"
    fetch_list = work / "fetch.txt"

    def plan() -> None:
        doc = json.loads(manifest.read_text())
        lines = []
        for i, layer in enumerate(doc["layers"]):
            lines.append(f'url = "{base}/blobs/{layer["digest"]}"\noutput = "{blobs}/{i:03d}"')
        fetch_list.write_text("\n".join(lines) + "\n")
        blobs.mkdir()

    return [
        Phase("resolve", ["curl", "-sfL", "-H", f"Accept: {ACCEPT}", "-o", str(manifest),
                          f"{base}/manifests/{image.tag}"]),
        Phase("plan", func=plan),
        Phase("download", ["curl", "-sfL", "--parallel", "--parallel-max", "8",
                           "--config", str(fetch_list)]),
    ]


def _lower_bound_apply(image: BenchImage, work: Path) -> Phase:
    """Each layer through ``pigz -dc | tar -x``. No whiteout logic: ``tar`` cannot put a file
    where a lower layer left a directory ("Cannot open: File exists"), and that one complaint
    is tolerated; any other error (a bad blob, a full disk) fails the run."""
    decomp = "zstd -dc" if image.compression == "zstd" else "pigz -dc"
    rootfs, blobs, err = _q(work / "rootfs"), _q(work / "blobs"), _q(work / "tar.err")
    return Phase("apply", f"set -o pipefail; mkdir {rootfs} || exit 1; for b in {blobs}/*; do "
                          f"{{ {decomp} \"$b\" | tar -x --numeric-owner -p -C {rootfs}; }} "
                          f"2> {err} || {{ grep -v -e 'Cannot open: File exists' "
                          f"-e 'Exiting with failure status' {err} >&2 && exit 1; }}; done; "
                          "exit 0", shell=True)


def lower_bound(ctx: Context, image: BenchImage, work: Path) -> list[Phase]:
    return [*_lower_bound_fetch(ctx, image, work), _lower_bound_apply(image, work),
            *size_and_mkfs(work / "rootfs", work / "out.ext4")]


def lower_bound_tar(ctx: Context, image: BenchImage, work: Path) -> list[Phase]:
    return [*_lower_bound_fetch(ctx, image, work), _lower_bound_apply(image, work),
            Phase("tar", ["tar", "-C", str(work / "rootfs"), "--numeric-owner", "-cf",
                          str(work / "out.tar"), "."])]


def record_output(result: RunResult, work: Path) -> None:
    """Output size (apparent and allocated: ext4 images are sparse) of a finished run."""
    for name in ("out.ext4", "out.tar"):
        path = work / name
        if path.exists():
            st = path.stat()
            result.output_size = st.st_size
            result.extra["output_allocated"] = st.st_blocks * 512
            return


CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Contender("ours-direct", "rootfs-export cold, direct", "ours", "ext4",
              _ours("direct"), parse_ours),
    Contender("ours-stream", "rootfs-export cold, stream", "ours", "ext4",
              _ours("stream"), parse_ours),
    Contender("ours-mount", "rootfs-export cold, mount", "ours", "ext4",
              _ours("mount"), parse_ours),
    Contender("ours-dir", "rootfs-export cold, dir", "ours", "ext4", _ours("dir"), parse_ours),
    Contender("ours-warm", "rootfs-export warm (default method)", "ours", "ext4",
              _ours(None, warm=True), parse_ours),
    Contender("ours-warm-stream", "rootfs-export warm, stream", "ours", "ext4",
              _ours("stream", warm=True), parse_ours),
    Contender("ours-lowdisk", "rootfs-export cold, --low-disk", "ours", "ext4",
              _ours(None, low_disk=True), parse_ours),
    Contender("skopeo-umoci", "skopeo copy + umoci raw unpack + mkfs.ext4 -d", "baseline", "ext4",
              skopeo_umoci),
    Contender("lower-bound", "curl + pigz|tar + mkfs.ext4 -d (C lower bound)", "baseline", "ext4",
              lower_bound),
    Contender("ours-tar", "rootfs-export cold, --format tar", "ours", "tar",
              _ours(None, fmt="tar"), parse_ours),
    Contender("lower-bound-tar", "curl + pigz|tar -x + tar -c (C lower bound)", "baseline", "tar",
              lower_bound_tar),
]}

GROUPS = {
    "all": list(CONTENDERS),
    "baseline": [n for n, c in CONTENDERS.items() if c.kind == "baseline"],
    "ours": [n for n, c in CONTENDERS.items() if c.kind == "ours"],
}


def select(spec: str) -> list[str]:
    """``all``, ``ours``, ``baseline`` or a comma list of contender names (groups allowed)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        picked = GROUPS.get(part) or ([part] if part in CONTENDERS else None)
        if picked is None:
            raise ValueError(f"unknown contender {part!r}; known: "
                             f"{', '.join([*GROUPS, *CONTENDERS])}")
        names += [n for n in picked if n not in names]
    return names
