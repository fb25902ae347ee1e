"""The run report's facts: what a user wants to see first after a bucket job, read from its tables.

    facts = collect("s3://bucket/out/")            # dict of counts, histograms, runs, gallery
    html = pipeline.report.html.render(facts)      # one self-contained page

Reads only what it needs, so a 10M-image output reports in about a minute on one machine:
- the images table's small columns for every row (status, num_proposals, run_id); the error
  text and URI only of the rows that are not ok;
- the masks table only for a sample of images (score, area, scale of their proposals, and the
  gallery's masks), found through the files' image_id statistics;
- the tables' commit history (runs, their settings and how they ended, throughput over time);
- the pixels of the gallery's few images.
"""
from __future__ import annotations

import base64
import calendar
import hashlib
import io
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ifcn.evaluation.recall import up_to
from ifcn.image import decode_image, one_line, read_bytes

STATUSES = ("ok", "error", "retry")
TIMINGS = ("read_ms", "decode_ms", "infer_ms", "postprocess_ms")
EXAMPLES_PER_REASON = 3  # URIs shown for each error reason


@dataclass(frozen=True)
class ReportConfig:
    """What the page samples; defaults keep a 10M-image report near a minute and the page < 5 MB."""

    samples: int = 6  # gallery images: a few, large enough to read
    top: int = 5  # proposals drawn on each gallery image
    thumb_px: int = 480  # gallery thumbnails' long side
    stats_images: int = 2000  # images whose proposals feed the score / area histograms
    bins: int = 20
    max_error_reasons: int = 20


def collect(output: str, storage_options: dict[str, Any] | None = None, annotations: str | None = None,
            config: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Everything the page shows, as plain values (JSON-able apart from the thumbnails' base64 text)."""
    from pipeline.tables.output import open_table, read_output

    table = open_table(output, "images", storage_options)  # its log is read once, for history and stats
    images = read_output(output, "images", ["image_id", "status", "num_proposals", *TIMINGS],
                         storage_options=storage_options)
    facts: dict[str, Any] = {"output": output, "images": _inputs(images), "timings": timings(images)}
    bad = read_output(output, "images", ["uri", "status", "error"], filter=ds.field("status") != "ok",
                      storage_options=storage_options)
    facts["errors"] = error_groups(bad, config.max_error_reasons)
    commits = history(table)
    facts["runs"] = runs(commits, rows_per_run(table))
    for r in facts["runs"]:
        r["checkpoint_info"] = peek_checkpoint(r.get("checkpoint"), storage_options)
    facts["skipped_keys"] = _skipped(commits)
    facts["throughput"] = throughput(commits)
    ok = images.filter(pc.equal(images.column("status"), "ok"))
    facts["proposals_per_image"] = histogram(ok.column("num_proposals").to_numpy(zero_copy_only=False), config.bins,
                                             integer=True)
    with_masks = ok.filter(pc.greater(ok.column("num_proposals"), 0)).column("image_id").to_pylist()
    ordered = sample_ids(with_masks, max(config.stats_images, config.samples))  # one hash sort serves both
    stats_ids = ordered[:config.stats_images]
    masks = _masks_of(output, stats_ids, ["image_id", "score", "area", "scale"], storage_options)
    facts["proposal_sample_images"] = len(stats_ids)
    facts["scores"] = histogram(masks.column("score").to_numpy(zero_copy_only=False), config.bins, lo=0.0, hi=1.0)
    facts["area_by_scale"] = area_by_scale(masks, config.bins)
    gt = None
    if annotations:
        from ifcn.evaluation.recall import load_gt

        gt = load_gt(annotations, storage_options)
        facts["recall"] = kept_only(recall(output, gt, storage_options), kept_proposals(facts["runs"]))
    facts["gallery"] = gallery(output, ordered[:config.samples], config, storage_options, gt)
    return facts


def write_report(output: str, html: str | None = None, storage_options: dict[str, Any] | None = None,
                 annotations: str | None = None, config: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Collects, renders and writes the page (default OUTPUT/report.html); returns a summary for a log line."""
    from ifcn.io import join, write_bytes

    from .html import render

    start = time.perf_counter()
    html = html or join(output, "report.html")
    facts = collect(output, storage_options, annotations, config)
    page = render(facts).encode("utf-8")
    write_bytes(html, page, storage_options)
    return {**facts["images"], "runs": len(facts["runs"]), "pictures": len(facts["gallery"]), "html": html,
            "mb": len(page) / 1e6, "seconds": time.perf_counter() - start, "ar": facts.get("recall", {}).get("ar")}


def describe(summary: dict[str, Any]) -> str:
    """The one line jobs print after writing a report."""
    return (f"report of {summary['total']} images ({summary['ok']} ok, {summary['error']} errors, {summary['retry']} to "
            f"retry), {summary['runs']} run(s), {summary['pictures']} pictures: {summary['html']} "
            f"({summary['mb']:.2f} MB, {summary['seconds']:.1f} s)")


def _inputs(images: pa.Table) -> dict[str, int]:
    counts = Counter(images.column("status").to_pylist())
    return {"total": images.num_rows, **{s: counts.get(s, 0) for s in STATUSES},
            "proposals": int(pc.sum(images.column("num_proposals")).as_py() or 0)}


_URI_PREFIX = re.compile(r"^image \S+: ")


def error_groups(bad: pa.Table, limit: int) -> list[dict[str, Any]]:
    """Rows that are not ok, grouped by their reason with the URI taken out, most frequent first:
    [{status, reason, count, examples: [uri, ...]}]."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for uri, status, error in zip(*(bad.column(c).to_pylist() for c in ("uri", "status", "error"))):
        reason = _URI_PREFIX.sub("", error or "(no reason recorded)").replace(uri or "\0", "<uri>")
        groups[(status, reason)].append(uri)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [{"status": s, "reason": r, "count": len(uris), "examples": sorted(uris)[:EXAMPLES_PER_REASON]}
            for (s, r), uris in ordered[:limit]]


def history(dt: Any) -> list[dict[str, Any]]:
    """The commits of images table `dt` that carry a run record, oldest first:
    [{version, timestamp (ms), record}] (the record's counts are the run's totals at that commit)."""
    from pipeline.tables.delta import RUN_KEY

    commits = dt.history()
    return sorted(({"version": c.get("version"), "timestamp": int(c.get("timestamp") or 0), "record": c[RUN_KEY]}
                   for c in commits if isinstance(c.get(RUN_KEY), dict)), key=lambda c: c["version"])


def _epoch_ms(utc: str | None) -> int | None:
    try:
        return int(calendar.timegm(time.strptime(utc, "%Y-%m-%dT%H:%M:%SZ")) * 1000) if utc else None
    except ValueError:
        return None


def rows_per_run(dt: Any) -> Counter:
    """Images rows per run_id of images table `dt`, from the Delta log alone: every data file holds
    one shard of one run, so its stats (run_id min = max, numRecords) say it without reading a row."""
    per_run: Counter = Counter()
    adds = dt.get_add_actions(flatten=True)
    runs_min, runs_max = adds.column("min.run_id").to_pylist(), adds.column("max.run_id").to_pylist()
    for lo, hi, n in zip(runs_min, runs_max, adds.column("num_records").to_pylist()):
        if lo != hi:  # not written by jobs.segment; count nothing rather than guess
            continue
        per_run[lo] += int(n or 0)
    return per_run


def timings(images: pa.Table) -> dict[str, dict[str, float]]:
    """Median and 90th percentile of each per-image timing column (ok images)."""
    ok = images.filter(pc.equal(images.column("status"), "ok"))
    out = {}
    for name in TIMINGS:
        v = ok.column(name).drop_null().to_numpy(zero_copy_only=False)
        if v.size:
            out[name] = {"median": float(np.median(v)), "p90": float(np.percentile(v, 90))}
    return out


def runs(commits: list[dict[str, Any]], per_run: Counter) -> list[dict[str, Any]]:
    """One entry per run, oldest first: when, settings, images it processed, images/s from its start
    to its last commit, how it ended (its last record), and how many images rows it still owns."""
    last: dict[str, dict[str, Any]] = {}
    for c in commits:
        last[c["record"]["run_id"]] = c
    out = []
    for rid, c in last.items():
        rec = c["record"]
        started = _epoch_ms(rec.get("started_at")) or c["timestamp"]
        processed = int((rec.get("counts") or {}).get("num_images", 0))
        span_s = (c["timestamp"] - started) / 1000
        ended = "running or killed (no end record)" if rec.get("exit") == "running" else rec.get("exit")
        out.append({"run_id": rid, "started": started, "settings": rec.get("settings"), "images": processed,
                    "checkpoint": rec.get("checkpoint"), "checkpoint_sha256": rec.get("checkpoint_sha256"),
                    "versions": rec.get("versions") or {}, "resources": rec.get("resources") or {},
                    "images_per_s": round(processed / span_s, 3) if span_s > 0 else None,
                    "complete": bool(rec.get("complete")), "ended": ended, "rows_in_table": per_run.get(rid, 0),
                    "planned": rec.get("planned") or {}})
    return sorted(out, key=lambda r: r["started"])


def _skipped(commits: list[dict[str, Any]]) -> dict[str, int]:
    """Skipped keys by extension, as the latest run that recorded them saw the input."""
    for c in reversed(commits):
        if c["record"].get("skipped_keys") is not None:
            return dict(c["record"]["skipped_keys"])
    return {}


def throughput(commits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Images committed over time, per run: [{run_id, t_s (since the run started), images}] for each
    commit that added images (the run's start and end records add none)."""
    points, last = [], {}
    for c in commits:
        rec = c["record"]
        t0 = _epoch_ms(rec.get("started_at")) or c["timestamp"]
        n = int((rec.get("counts") or {}).get("num_images", 0))
        if n == 0 or last.get(rec["run_id"]) == n:
            continue
        last[rec["run_id"]] = n
        points.append({"run_id": rec["run_id"], "t_s": max(0.0, (c["timestamp"] - t0) / 1000), "images": n})
    return points


def kept_proposals(runs_: list[dict[str, Any]]) -> int | None:
    """Proposals kept per image by the latest run (its max_proposals setting), or None if unrecorded."""
    for r in reversed(runs_):
        kept = ((r.get("settings") or {}).get("inference") or {}).get("max_proposals")
        if kept:
            return int(kept)
    return None


def kept_only(r: dict[str, Any], kept: int | None) -> dict[str, Any]:
    """The recall facts with AR@k only for the k a run with `kept` proposals per image can have."""
    if not kept:
        return r
    return {**r, "ar": up_to(r["ar"], kept), "kept": kept, "dets": min(kept, r["dets"])}


def histogram(values: np.ndarray, bins: int, lo: float | None = None, hi: float | None = None,
              integer: bool = False) -> dict[str, Any]:
    """{edges, counts, n, mean, median} of `values`; integer data gets integer-aligned edges."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"edges": [], "counts": [], "n": 0, "mean": None, "median": None}
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    if integer:  # bins of whole numbers, each centred on the values it holds (one value: one bar at it)
        width = max(1, int(np.ceil((hi - lo + 1) / bins)))
        edges = np.arange(lo - 0.5, hi + 0.5 + width, width, dtype=np.float64)
        edges = edges[: int(np.searchsorted(edges, hi + 0.5)) + 1]
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    counts, edges = np.histogram(values, edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "n": int(values.size),
            "mean": float(values.mean()), "median": float(np.median(values))}


def area_by_scale(masks: pa.Table, bins: int) -> list[dict[str, Any]]:
    """Per inference scale: a histogram of log10 mask area (areas span 1 to millions of pixels)."""
    if masks.num_rows == 0:
        return []
    area = np.log10(np.maximum(masks.column("area").to_numpy(zero_copy_only=False), 1))
    scale = masks.column("scale").to_numpy(zero_copy_only=False)
    lo, hi = 0.0, float(max(1.0, np.ceil(area.max())))
    return [{"scale": int(s), **histogram(area[scale == s], bins, lo, hi)} for s in np.unique(scale)]


def sample_ids(ids: list[str], n: int) -> list[str]:
    """n ids chosen by a hash of the id: the same output gives the same sample, whatever the row order."""
    return sorted(ids, key=lambda i: hashlib.blake2b(i.encode(), digest_size=8).digest())[:n]


def _masks_of(output: str, image_ids: list[str], columns: list[str],
              storage_options: dict[str, Any] | None) -> pa.Table:
    from pipeline import read_output
    from pipeline.tables.schema import VIEWS

    if not image_ids:  # an output with no proposals (every image failed): an empty filter would not bind
        return VIEWS["masks"].empty_table().select(columns)
    return read_output(output, "masks", columns, storage_options=storage_options, image_ids=image_ids)


def gallery(output: str, image_ids: list[str], config: ReportConfig,
            storage_options: dict[str, Any] | None, gt: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Sampled images with their top proposals drawn (numbered labels that do not collide; ground
    truth outlined when `gt` is given), as inline JPEG thumbnails:
    [{image_id, uri, proposals, drawn, scores, truth, jpeg_b64 | error}]."""
    from .plots import gallery_picture

    truth_of = _truth_masks(gt)

    masks = _masks_of(output, image_ids, ["image_id", "uri", "rank", "score", "bbox", "rle", "height", "width"],
                      storage_options)
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in masks.sort_by([("image_id", "ascending"), ("rank", "ascending")]).to_pylist():
        by_image[row["image_id"]].append(row)
    out = []
    for image_id in image_ids:
        rows = by_image.get(image_id, [])
        if not rows:
            continue
        uri = rows[0]["uri"]
        proposals = [{"rank": r["rank"], "score": r["score"], "bbox": r["bbox"],
                      "rle": {"size": [r["height"], r["width"]], "counts": r["rle"]}} for r in rows][:config.top]
        entry = {"image_id": image_id, "uri": uri, "proposals": len(rows), "drawn": len(proposals),
                 "scores": [float(p["score"]) for p in proposals], "truth": None}
        try:
            pixels = decode_image(read_bytes(uri, storage_options), uri)
            truth = truth_of(image_id, uri, pixels.shape[:2]) if truth_of else None
            entry["truth"] = None if truth is None else len(truth)
            picture = gallery_picture(pixels, proposals, config.thumb_px, truth)
        except Exception as e:  # a vanished or replaced image: say so on the page, keep the report
            entry["error"] = f"{type(e).__name__}: {one_line(e)}"
            out.append(entry)
            continue
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=82)
        entry["jpeg_b64"] = base64.b64encode(buf.getvalue()).decode("ascii")
        out.append(entry)
    return out


def recall(output: str, gt: dict[str, Any], storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """AR@10/100/1000 overall and by size (COCO's IoU 0.50:0.05:0.95, class-agnostic) and recall
    against IoU at each of COCOeval's proposal counts, from the masks view and COCO annotations `gt`."""
    from ifcn.evaluation.recall import IOU_LABELS, RESULT_COLUMNS, coco_eval, recall_from_eval, results_from_masks
    from pipeline import read_output

    results = results_from_masks(read_output(output, "masks", list(RESULT_COLUMNS), storage_options=storage_options),
                                 gt)
    ev = coco_eval(gt, results)
    p = ev.params
    curves = {int(m): [float(r) for r in ev.eval["recall"][:, 0, p.areaRngLbl.index("all"), i]]  # (T,) each
              for i, m in enumerate(p.maxDets)}
    return {"ar": recall_from_eval(ev), "protocol": IOU_LABELS["coco"], "images": len(gt["images"]),
            "iou": [float(t) for t in p.iouThrs], "curves": curves, "dets": max(curves)}


def peek_checkpoint(url: str | None, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A checkpoint's kind, model config and training scales from its pickle header alone (the zip's
    central directory and data.pkl are read: no tensor, no torch), or None if it cannot be read."""
    import zipfile

    from ifcn.models.checkpoint_header import _HeaderUnpickler, checkpoint_kind
    from ifcn.io import open_url

    if not url:
        return None
    try:
        with open_url(url, "rb", storage_options) as f, zipfile.ZipFile(f) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            with z.open(name) as pkl:
                header = _HeaderUnpickler(pkl).load()
        train = (header.get("extra") or {}).get("train_config") or {}
        return {"kind": checkpoint_kind(header), "backbone": (header.get("config") or {}).get("backbone"),
                "trained_scales": [int(v) for v in train.get("scales") or []] or None,
                "step": (header.get("extra") or {}).get("step")}
    except Exception:  # moved or unreadable: the report says "unknown"
        return None


def _truth_masks(gt: dict[str, Any] | None):
    """(image_id, uri, (H, W)) -> the ground-truth masks of that image in `gt` (None if it is not there)."""
    if not gt:
        return None
    from pycocotools import mask as mask_utils

    from ifcn.evaluation.recall import FileNameMatcher

    match = FileNameMatcher(gt["images"])
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in gt.get("annotations", []):
        by_image[a["image_id"]].append(a)

    def masks(image_id: str, uri: str, shape: tuple[int, int]) -> list[np.ndarray] | None:
        coco_id = match(image_id, uri)
        if coco_id is None:
            return None
        out = []
        for a in by_image.get(coco_id, []):
            seg = a["segmentation"]
            rles = mask_utils.frPyObjects(seg, *shape) if isinstance(seg, list) or isinstance(seg.get("counts"), list) \
                else seg
            out.append(mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles).astype(bool))
        return out

    return masks
