"""Turning ``results.json`` into the markdown table, the PNG chart and the headline summary.

Can be re-run on saved results: ``python -m bench.report bench/results/results.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

MiB = 1 << 20
RSS_TARGET = 256 * MiB
OURS_COLD = ["ours-direct", "ours-stream", "ours-mount", "ours-dir"]
ORDER = ["ours-direct", "ours-stream", "ours-mount", "ours-dir", "ours-warm", "ours-warm-stream",
         "ours-lowdisk", "skopeo-umoci", "lower-bound", "ours-tar", "lower-bound-tar"]


def _group(runs: list[dict[str, Any]], series: str = "main") -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        if r.get("extra", {}).get("series", "main") == series:
            out[(r["image"], r["contender"])].append(r)
    return out


def _ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["ok"]]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def med_wall(runs: list[dict]) -> float | None:
    return _median([r["wall"] for r in _ok(runs)])


def med_phase(runs: list[dict], phase: str) -> float | None:
    return _median([r["phases"][phase] for r in _ok(runs) if phase in r["phases"]])


def default_ours(runs: list[Any]) -> str:
    """The fastest cold ext4 method measured in the main rounds (for the scaling series)."""
    dicts = [r if isinstance(r, dict) else r.to_dict() for r in runs]
    best, best_t = "ours-direct", None
    for name in OURS_COLD:
        walls = [r["wall"] for r in dicts if r["contender"] == name and r["ok"]]
        if walls and (best_t is None or statistics.median(walls) < best_t):
            best, best_t = name, statistics.median(walls)
    return best


def _fmt(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _mb(v: float | None) -> float | None:
    return None if v is None else v / 1e6


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _verdict(value: float | None, target: float, lower_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    ok = value <= target if lower_is_better else value >= target
    return "met" if ok else "NOT met"


def headline(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per issue-6 target and image: measured value, target, verdict."""
    runs = doc["runs"]
    g = _group(runs)
    images = [i for i in doc["images"] if any(k[0] == i for k in g)]
    rows: list[dict[str, Any]] = []
    for img in images:
        colds: dict[str, float] = {}
        for n in OURS_COLD:
            w = med_wall(g.get((img, n), []))
            if w is not None:
                colds[n] = w
        best = min(colds, key=colds.__getitem__) if colds else None
        best_t = colds.get(best) if best else None
        sk = med_wall(g.get((img, "skopeo-umoci"), []))
        lb = med_wall(g.get((img, "lower-bound"), []))
        lb_mkfs = med_phase(g.get((img, "lower-bound"), []), "mkfs")
        warm = med_wall(g.get((img, "ours-warm"), []))
        label = f"{img} ({best.removeprefix('ours-')})" if best else img
        per_method = ", ".join(f"{n.removeprefix('ours-')} {t:.1f}s" for n, t in colds.items())
        r = _ratio(best_t, sk)
        rows.append(dict(target="cold ext4 / dockerless pipeline", image=label, value=r,
                         goal="<= 0.4", verdict=_verdict(r, 0.4),
                         detail=f"{per_method}; skopeo-umoci {_fmt(sk, 1)}s"))
        r = _ratio(best_t, lb)
        rows.append(dict(target="cold ext4 / C lower bound", image=label, value=r,
                         goal="<= 1.3", verdict=_verdict(r, 1.3),
                         detail=f"{per_method}; lower bound {_fmt(lb, 1)}s"))
        r = _ratio(warm, lb_mkfs)
        rows.append(dict(target="warm export / lower bound's mkfs step", image=img, value=r,
                         goal="<= 1.1", verdict=_verdict(r, 1.1),
                         detail=f"warm {_fmt(warm, 1)}s; mkfs.ext4 -d {_fmt(lb_mkfs, 1)}s"))
        ours_runs = [x for (i, c), rs in g.items() if i == img and c.startswith("ours")
                     for x in _ok(rs)]
        top = max(ours_runs, key=lambda x: x["peak_rss"], default=None)
        rss = top["peak_rss"] / MiB if top else None
        parts = top["extra"].get("peak_rss_by_process", {}) if top else {}
        rows.append(dict(target="peak RSS, MiB (max over our runs)", image=img, value=rss,
                         goal="<= 256", verdict=_verdict(rss, 256),
                         detail=(f"{top['contender']}: " + ", ".join(
                             f"{k} {v / MiB:.0f}" for k, v in sorted(
                                 parts.items(), key=lambda kv: -kv[1]))) if top else ""))
        low = _ok(g.get((img, "ours-lowdisk"), []))
        if low:
            meta = doc["images"][img]
            peak = max(x["peak_disk"] for x in low)
            out = max(x["extra"].get("output_allocated", x["output_size"]) for x in low)
            budget = out + meta["largest_layer"] + 64 * MiB
            rows.append(dict(target="low-disk peak extra disk / (output + largest layer + 64 MiB)",
                             image=img, value=peak / budget, goal="<= 1.0",
                             verdict=_verdict(peak / budget, 1.0),
                             detail=f"peak {peak / MiB:.0f} MiB; output {out / MiB:.0f} MiB "
                                    f"allocated, largest layer {meta['largest_layer'] / MiB:.0f}"
                                    " MiB"))
        else:
            rows.append(dict(target="low-disk peak extra disk / budget", image=img, value=None,
                             goal="<= 1.0", verdict="not measured", detail=""))
    stream = {r["contender"]: r for r in runs if r.get("extra", {}).get("series") == "stream"}
    pull = stream.get("pull-single")
    if pull and pull["ok"]:
        size = doc["images"][pull["image"]]["compressed_bytes"]
        full = size / pull["wall"] / 1e9
        curl = stream.get("curl-single")
        curl_detail = (f"; curl alone {size / curl['wall'] / 1e9:.2f} GB/s"
                       if curl and curl["ok"] else "")
        down = pull.get("extra", {}).get("download_seconds")
        if down:
            gbs = size / down / 1e9
            rows.append(dict(target="download, one stream, GB/s (network + sha256 + write)",
                             image=pull["image"], value=gbs, goal=">= 0.5",
                             verdict=_verdict(gbs, 0.5, lower_is_better=False),
                             detail=f"{size / 1e6:.0f} MB downloaded in {down:.2f}s; the full "
                                    f"pull (inflate, diff_id, index; process start) "
                                    f"{full:.2f} GB/s in {pull['wall']:.1f}s" + curl_detail))
        else:
            rows.append(dict(target="download, one stream, GB/s (pull incl. inflate+index)",
                             image=pull["image"], value=full, goal=">= 0.5",
                             verdict=_verdict(full, 0.5, lower_is_better=False),
                             detail=f"{size / 1e6:.0f} MB in {pull['wall']:.1f}s" + curl_detail))
    return rows


PHASE_ORDER = ["resolve", "copy", "download", "plan", "unpack", "apply", "size", "package", "mkfs",
               "tar", "check", "sha256"]
PHASE_COLORS = {"resolve": "tab:purple", "copy": "tab:blue", "download": "tab:blue",
                "plan": "tab:pink", "unpack": "tab:orange", "apply": "tab:orange",
                "size": "tab:olive", "package": "tab:green", "mkfs": "tab:green",
                "tar": "tab:green", "check": "tab:cyan", "sha256": "tab:brown",
                "other": "lightgray"}


def phase_medians(runs: list[dict]) -> dict[str, float]:
    """Median seconds per phase, in pipeline order; rootfs-export's own timings where it gave
    them, and the rest of its wall time (process start, imports) as ``other``."""
    ok = _ok(runs)
    if not ok:
        return {}
    names: list[str] = []
    for r in ok:
        source = r.get("engine_timings") or r["phases"]
        names += [k for k in source if k not in names and k != "total"]
    names.sort(key=lambda k: PHASE_ORDER.index(k) if k in PHASE_ORDER else len(PHASE_ORDER))
    out = {}
    for k in names:
        vals = [(r.get("engine_timings") or r["phases"]).get(k) for r in ok]
        nums = [v for v in vals if v is not None]
        if nums:
            out[k] = statistics.median(nums)
    if any(r.get("engine_timings") for r in ok):
        out["other"] = max(0.0, statistics.median([r["wall"] for r in ok]) - sum(out.values()))
    return out


def _phases_str(runs: list[dict]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in phase_medians(runs).items()
                     if k != "plan" or v >= 0.05)


def render(doc: dict[str, Any], elapsed: float | None = None,
           results_dir: Path | None = None) -> tuple[str, str]:
    """(RESULTS.md text, short plain-text summary of the headline ratios)."""
    runs = doc["runs"]
    elapsed = elapsed or doc.get("elapsed")
    v = doc.get("versions", {})
    lines = ["# rootfs-export benchmark results", "",
             f"Run {doc.get('started', '?')}"
             + (f" (more rounds from {', '.join(doc['merged'])})" if doc.get("merged") else "")
             + (f", {elapsed / 60:.1f} min" if elapsed else "")
             + f"; rounds per image: {doc.get('rounds_done') or doc.get('args', {}).get('rounds', '?')}"
             f" (contender order rotated each round). "
             f"Machine: {v.get('cpu', '?')}, {v.get('cpus', '?')} CPUs, kernel "
             f"{v.get('kernel', '?')}. Generated by `python -m bench`; every figure is the median "
             "over the rounds unless marked min/max.", "",
             "Tools: " + "; ".join(f"{k} {val}" for k, val in v.items()
                                   if k not in ("cpu", "cpus", "kernel")), "",
             "## Images", "",
             "| image | description | layers | compressed MB | tar MB | tree MB | entries |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, m in doc["images"].items():
        lines.append(f"| {name} | {m['description']} | {m['layers']} | "
                     f"{m['compressed_bytes'] / 1e6:.0f} | {m['uncompressed_bytes'] / 1e6:.0f} | "
                     f"{m['tree_bytes'] / 1e6:.0f} | {m['entries']} |")
    rows = headline(doc)
    lines += ["", "## Targets (issue 6)", "",
              "| target | image (fastest method) | measured | goal | verdict | detail |",
              "|---|---|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['image']} | {_fmt(r['value'])} | {r['goal']} | "
                     f"{r['verdict']} | {r.get('detail', '')} |")
    g = _group(runs)
    for img in doc["images"]:
        names = [c for c in ORDER if (img, c) in g]
        if not names:
            continue
        meta = doc["images"][img]
        sk = med_wall(g.get((img, "skopeo-umoci"), []))
        lb = med_wall(g.get((img, "lower-bound"), []))
        lbt = med_wall(g.get((img, "lower-bound-tar"), []))
        lines += ["", f"## Image {img}: {meta['description']}", "",
                  "| contender | median s | min s | max s | / skopeo-umoci | / lower bound | "
                  "phases (median s) | peak RSS MiB | peak disk MiB | output MB | MB/s | "
                  "entries/s | ok |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for c in names:
            rs = g[(img, c)]
            ok = _ok(rs)
            walls = [r["wall"] for r in ok]
            m = _median(walls)
            base_lb = lbt if c.endswith("tar") else lb
            vs_sk = "" if c.endswith("tar") else _fmt(_ratio(m, sk))
            lines.append(
                f"| {c} | {_fmt(m)} | {_fmt(min(walls) if walls else None)} | "
                f"{_fmt(max(walls) if walls else None)} | {vs_sk} | {_fmt(_ratio(m, base_lb))} | "
                f"{_phases_str(rs)} | "
                f"{_fmt(max((r['peak_rss'] for r in ok), default=0) / MiB, 0)} | "
                f"{_fmt(max((r['peak_disk'] for r in ok), default=0) / MiB, 0)} | "
                f"{_fmt(_mb(_median([r['output_size'] for r in ok])), 0)} | "
                f"{_fmt(meta['uncompressed_bytes'] / 1e6 / m if m else None, 0)} | "
                f"{_fmt(meta['entries'] / m if m else None, 0)} | {len(ok)}/{len(rs)} |")
        tar_step = med_phase(g.get((img, "lower-bound-tar"), []), "tar")
        ours_tar = med_wall(g.get((img, "ours-tar"), []))
        if ours_tar and tar_step:
            lines.append(f"\n`--format tar`: rootfs-export {ours_tar:.2f} s end to end vs the "
                         f"lower bound's whole pipeline {_fmt(lbt)} s "
                         f"(ratio {_fmt(_ratio(ours_tar, lbt))}) and its `tar -c` step alone "
                         f"{tar_step:.2f} s.")
    lines += _scaling_md(doc)
    fails = [r for r in runs if not r["ok"]]
    if fails:
        lines += ["", "## Failed runs", ""]
        seen = set()
        for r in fails:
            key = (r["image"], r["contender"], r["error"].splitlines()[0] if r["error"] else "")
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {r['image']} / {r['contender']}: `{key[2][:200]}`")
    if results_dir is not None:
        for prof in sorted(results_dir.glob("profile-*.txt")):
            text = prof.read_text().splitlines()
            lines += ["", f"## Profile ({prof.name})", "", "```", *text[:48], "```"]
    lines += ["", "## How to read this", "",
              "- Wall time is end to end, process start included. Phases of rootfs-export come "
              "from its `--json` timings; those of the pipelines are their commands.",
              "- Peak RSS sums the resident memory of the whole process tree (sampled every "
              "50 ms); peak disk is the growth of used blocks on the work directory's "
              "filesystem (statvfs, sampled every 50 ms), caches and outputs included.",
              "- MB/s is the image's uncompressed tar bytes over the wall time; entries/s the "
              "final tree's entries over the wall time.",
              "- The C lower bound applies no whiteouts (its tree keeps deleted files) and does "
              "no verification; the skopeo pipeline's and the lower bound's ext4 file is sized "
              "du -sb x 1.2 + 64 MiB + 4 KiB per entry, with entries x 1.2 inodes.", ""]
    summary = ["", "headline ratios (median of rounds):"]
    for r in rows:
        summary.append(f"  {r['target']:<62s} {r['image']:<14s} {_fmt(r['value']):>7s} "
                       f"(goal {r['goal']}) {r['verdict']}")
    return "\n".join(lines) + "\n", "\n".join(summary)


def _scaling_md(doc: dict[str, Any]) -> list[str]:
    runs = doc["runs"]
    lines: list[str] = []
    for series, title in (("size", "Time vs image size"),
                          ("layers", "Time vs layer count (same content)")):
        g = _group(runs, series)
        if not g:
            continue
        contenders = sorted({c for _, c in g})
        lines += ["", f"## {title}", "",
                  "| image | layers | tree MB | entries | " +
                  " | ".join(f"{c} s" for c in contenders) +
                  " | " + " | ".join(f"{c} s/GB" for c in contenders) + " |",
                  "|---|---:|---:|---:|" + "---:|" * (2 * len(contenders))]
        for img in dict.fromkeys(i for i, _ in g):
            meta = doc["images"][img]
            walls = [med_wall(g.get((img, c), [])) for c in contenders]
            per_gb = [None if w is None else w / (meta["tree_bytes"] / 1e9) for w in walls]
            lines.append(f"| {img} | {meta['layers']} | {meta['tree_bytes'] / 1e6:.0f} | "
                         f"{meta['entries']} | " + " | ".join(_fmt(w) for w in walls) + " | "
                         + " | ".join(_fmt(p) for p in per_gb) + " |")
    conc = [r for r in runs if r.get("extra", {}).get("series") == "concurrency"]
    if conc:
        lines += ["", "## Download throughput vs concurrency (`rootfs-export pull`, fresh cache, "
                  f"image {conc[0]['image']})", "", "| concurrency | wall s | MB/s (compressed) |",
                  "|---:|---:|---:|"]
        for r in conc:
            size = doc["images"][r["image"]]["compressed_bytes"]
            lines.append(f"| {r['extra']['concurrency']} | {_fmt(r['wall'] if r['ok'] else None)}"
                         f" | {_fmt(size / r['wall'] / 1e6 if r['ok'] else None, 0)} |")
    stream = [r for r in runs if r.get("extra", {}).get("series") == "stream"]
    if stream:
        parts = []
        for r in stream:
            size = doc["images"][r["image"]]["compressed_bytes"]
            text = f"{r['contender']} {_fmt(size / r['wall'] / 1e6 if r['ok'] else None, 0)} MB/s"
            down = r.get("extra", {}).get("download_seconds")
            if r["ok"] and down:
                text += f" (its download alone: {_fmt(size / down / 1e6, 0)} MB/s)"
            parts.append(text)
        lines += ["", "One stream (single-layer image, one connection): " + "; ".join(parts)
                  + ". `pull` includes process start, resolving, hashing, inflating and "
                  "indexing; its download figure counts network, blob sha256 and the temp-file "
                  "write until the last byte is on disk (inflate and index run beside it); curl "
                  "only writes the blob."]
    return lines


def chart(doc: dict[str, Any], path: Path) -> None:
    """bench.png: per-image bars (median, min-max whiskers) and the scaling series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    g = _group(runs)
    main_images = [i for i in doc["images"] if any(k[0] == i for k in g)]
    ncols = max(3, len(main_images))
    fig, axes = plt.subplots(2, ncols, figsize=(4.6 * ncols, 9), squeeze=False)
    seen_phases: dict[str, Any] = {}
    for ax, img in zip(axes[0], main_images, strict=False):
        names = [c for c in ORDER if (img, c) in g and _ok(g[(img, c)])]
        for y, c in enumerate(names):
            left = 0.0
            for phase, secs in phase_medians(g[(img, c)]).items():
                bar = ax.barh(y, secs, left=left, color=PHASE_COLORS.get(phase, "gray"),
                              edgecolor="black" if c.startswith("ours") else "none",
                              linewidth=0.6)
                seen_phases.setdefault(phase, bar)
                left += secs
            walls = [r["wall"] for r in _ok(g[(img, c)])]
            m = statistics.median(walls)
            ax.errorbar(m, y, xerr=[[m - min(walls)], [max(walls) - m]], color="black",
                        capsize=3, linewidth=0.8)
            ax.text(max(walls), y, f" {m:.1f}s", va="center", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"image {img}: {doc['images'][img]['tree_bytes'] / 1e6:.0f} MB, "
                     f"{doc['images'][img]['entries']} entries", fontsize=9)
        ax.set_xlabel("wall time, s (median by phase; whiskers min-max)", fontsize=8)
        ax.margins(x=0.15)
    if seen_phases:
        fig.legend(list(seen_phases.values()), list(seen_phases), fontsize=8,
                   loc="upper center", ncol=len(seen_phases), bbox_to_anchor=(0.5, 0.955),
                   frameon=False, title="phases (black edge: rootfs-export)",
                   title_fontsize=8)
    for ax in axes[0][len(main_images):]:
        ax.axis("off")
    # scaling: size
    ax = axes[1][0]
    for series, ax, xkey, xlabel in (("size", axes[1][0], "tree_bytes", "tree size, GB"),
                                     ("layers", axes[1][1], "layers", "layer count")):
        sg = _group(runs, series)
        for c in sorted({c for _, c in sg}):
            pts = sorted((doc["images"][i][xkey] / (1e9 if xkey == "tree_bytes" else 1),
                          med_wall(rs)) for (i, cc), rs in sg.items() if cc == c and med_wall(rs))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("wall time, s")
        ax.set_title(f"scaling: time vs {xlabel.split(',')[0]}", fontsize=9)
        if xkey == "layers":
            ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes[1][2]
    conc = [r for r in runs if r.get("extra", {}).get("series") == "concurrency" and r["ok"]]
    if conc:
        size = doc["images"][conc[0]["image"]]["compressed_bytes"]
        xs = [r["extra"]["concurrency"] for r in conc]
        ax.plot(xs, [size / r["wall"] / 1e6 for r in conc], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent layer downloads")
    ax.set_ylabel("MB/s (compressed)")
    ax.set_title("rootfs-export pull: throughput vs concurrency", fontsize=9)
    for ax in axes[1][3:]:
        ax.axis("off")
    fig.suptitle("rootfs-export vs skopeo+umoci+mkfs and the C lower bound "
                 f"({doc.get('started', '')})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(doc: dict[str, Any], other: dict[str, Any]) -> None:
    """Append ``other``'s main-table runs to ``doc`` as further rounds (same machine, a later
    ``--no-scaling`` invocation that had time for more rounds)."""
    offset = max((r["round"] for r in doc["runs"] if r["extra"].get("series") == "main"),
                 default=0)
    added = set()
    for r in other["runs"]:
        if r["extra"].get("series", "main") == "main":
            r["round"] += offset
            added.add(r["round"])
            doc["runs"].append(r)
    doc["rounds_done"] = (doc.get("rounds_done") or offset) + len(added)
    doc.setdefault("merged", []).append(other.get("started", "?"))


def main(argv: list[str]) -> int:
    """``python -m bench.report RESULTS.json [MORE.json ...]``: re-render, merging more rounds."""
    path = Path(argv[0]) if argv else Path(__file__).parent / "results" / "results.json"
    doc = json.loads(path.read_text())
    if len(argv) > 1:
        for extra in argv[1:]:
            merge(doc, json.loads(Path(extra).read_text()))
        path.write_text(json.dumps(doc, indent=1))
    md, summary = render(doc, None, path.parent)
    (path.parent / "RESULTS.md").write_text(md)
    chart(doc, path.parent / "bench.png")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
