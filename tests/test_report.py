"""jobs.report: one self-contained HTML page, opened in a real headless Chromium (no console error,
no uncaught exception), whose numbers equal counts computed from the Delta tables directly.

Run: pytest tests/test_report.py -q   (needs Debian's chromium; `make test` installs it)
"""
from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from browser import Chromium, require_chromium
from jobs.report import main
from test_show import H, W, fake_output

REPO = Path(__file__).resolve().parents[1]
MAX_PAGE_BYTES = 5_000_000

# JSON of what a reader of the page sees: every data-count, the error table, the gallery's images
PAGE_FACTS = """({
  counts: Object.fromEntries(Array.from(document.querySelectorAll('[data-count]')).map(e => [e.dataset.count, e.textContent])),
  errors: Array.from(document.querySelectorAll('#errors tbody tr')).map(r => Array.from(r.cells).slice(0, 3).map(c => c.textContent)),
  images: Array.from(document.querySelectorAll('#gallery img')).map(i => [i.complete, i.naturalWidth]),
  external: Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') || e.getAttribute('href'))
             .filter(u => !u.startsWith('data:')),
  ready: document.body.dataset.ready,
  axes: Array.from(document.querySelectorAll('svg text')).map(t => t.textContent.trim()).filter(t => t)
})"""


def bench_report():
    """bench/report.py by file path (bench/ must not go on sys.path: bench/pipeline.py shadows a package)."""
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_page(path: Path, shot: Path) -> dict:
    require_chromium()
    with Chromium() as browser:
        page = browser.open(path, PAGE_FACTS, screenshot=shot)
    assert page.errors == [], page.errors
    facts = page.values
    assert facts["ready"] == "1"  # the page's script ran to its end
    assert facts["external"] == []  # self-contained: nothing to fetch
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return facts


def table_counts(out: Path) -> dict[str, int]:
    """The page's headline numbers, computed from the tables with deltalake + pyarrow only."""
    images = DeltaTable(str(out / "segments")).to_pyarrow_table(columns=["status", "run_id", "proposals"])
    status = Counter(images.column("status").to_pylist())
    proposals = sum(len(p) for p in images.column("proposals").to_pylist())
    counts = {"images.total": images.num_rows, "images.proposals": proposals,
              **{f"images.{s}": status.get(s, 0) for s in ("ok", "error", "retry")}, "hist.per_image.n": status["ok"]}
    for run, n in Counter(images.column("run_id").to_pylist()).items():
        counts[f"run.{run}.rows"] = n
    return counts


def test_report_of_a_large_synthetic_output_matches_its_tables(tmp_path: Path) -> None:
    out = Path(bench_report().synthetic_output(tmp_path, 1500, seed=3))
    html = tmp_path / "page" / "report.html"
    assert main(["--output", str(out), "--html", str(html), "--samples", "12"]) == 0
    assert html.stat().st_size < MAX_PAGE_BYTES
    facts = open_page(html, tmp_path / "shot.png")
    expected = table_counts(out)
    assert {k: int(facts["counts"][k]) for k in expected} == expected
    assert int(facts["counts"]["images.proposals"]) > 10_000  # the sample is big enough to mean something
    # the run's record: images processed = the rows it wrote (one complete run), skipped keys as recorded
    run = next(k for k in expected if k.startswith("run."))[: -len(".rows")]
    assert int(facts["counts"][f"{run}.images"]) == expected["images.total"]
    assert facts["counts"]["skipped..txt"] == "3" and facts["counts"]["skipped.none"] == "1"
    # errors grouped by reason with the URI taken out, most frequent first, counted from the table
    bad = DeltaTable(str(out / "segments")).to_pyarrow_table(columns=["status", "error"])
    bad = bad.filter(pc.not_equal(bad.column("status"), "ok"))
    reasons = Counter((s, re.sub(r"^image \S+: ", "", e)) for s, e in zip(*(bad.column(c).to_pylist()
                                                                            for c in ("status", "error"))))
    shown = {(s, r): int(n) for s, n, r in facts["errors"]}
    assert shown == dict(reasons)
    assert [int(n) for _, n, _ in facts["errors"]] == sorted(reasons.values(), reverse=True)
    # the gallery: 12 drawn thumbnails, every one decoded by the browser
    # plots are drawn with axis labels and ticks (matplotlib SVG text), the proposals' histogram included
    for label in ("proposals kept per image", "images", "objectness score (probability)", "proposals",
                  "log10 of mask area (px)", "seconds since the run started (s)", "images committed"):
        assert label in facts["axes"], (label, facts["axes"][:40])
    assert sum(t.replace(".", "").isdigit() for t in facts["axes"]) > 20  # tick labels
    assert facts["counts"]["gallery.images"] == "12"
    assert len(facts["images"]) == 12 and all(ok and w > 0 for ok, w in facts["images"])


def test_report_recall_against_hand_counted_annotations(tmp_path: Path) -> None:
    """test_show's fake output: a/one.png has proposals at (y0, y1, x0, x1) (10,40,10,60), (50,90,70,120),
    (0,20,100,128); two.png at (20,60,20,60); late.png's files are uncommitted. Ground truth: three of
    those rectangles exactly, plus one no proposal covers, so every IoU threshold finds 3 of 4."""
    fake_output(tmp_path)
    out = tmp_path / "out"

    def rect(y0: int, y1: int, x0: int, x1: int, ann_id: int, image_id: int) -> dict:
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": [poly], "iscrowd": 0,
                "area": (y1 - y0) * (x1 - x0), "bbox": [x0, y0, x1 - x0, y1 - y0]}

    gt = {"images": [{"id": 1, "file_name": "a/one.png", "height": H, "width": W},
                     {"id": 2, "file_name": "two.png", "height": H, "width": W}],
          "categories": [{"id": 1, "name": "object"}],
          "annotations": [rect(10, 40, 10, 60, 1, 1), rect(0, 20, 100, 128, 2, 1), rect(60, 90, 0, 30, 3, 1),
                          rect(20, 60, 20, 60, 4, 2)]}
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    html = tmp_path / "r.html"
    assert main(["--output", str(out), "--html", str(html), "--annotations", str(ann)]) == 0
    counts = open_page(html, tmp_path / "shot.png")["counts"]
    # medium gts (1500, 1600 px) both found; small ones (560 found, 900 missed) half; no large gt
    assert {k: counts[k] for k in counts if k.startswith("ar.")} == {
        "ar.AR@10": "75.0", "ar.AR@100": "75.0", "ar.AR@1000": "75.0", "ar.AR_small@1000": "50.0",
        "ar.AR_medium@1000": "100.0", "ar.AR_large@1000": "n/a"}
    # the gallery outlines the ground truth of each drawn image: 3 objects on a/one.png, 1 on two.png
    assert (counts["truth.a/one.png"], counts["truth.two.png"]) == ("3", "1")
    # late.png (data files no commit added) is not counted; bad.jpg is an error row
    assert (counts["images.total"], counts["images.ok"], counts["images.error"], counts["images.proposals"]) == \
        ("3", "2", "1", "4")


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--output", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a jobs.segment output" in err[0]
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--samples", "-1"])


def all_error_output(root: Path) -> Path:
    """An output where every image failed (no proposals anywhere), written with deltalake's own writer."""
    from deltalake import write_deltalake
    from segment_helpers import nest

    reasons = ["not an image file; recorded as error row", "image has 2000000000 pixels, over --max-pixels"]
    images = [{"image_id": f"x{i}.jpg", "uri": f"file:///in/x{i}.jpg", "status": "error",
               "error": f"image x{i}.jpg: {reasons[i % 2]}", "num_proposals": 0, "shard_id": "00000",
               "run_id": "r1"} for i in range(5)]
    write_deltalake(str(root / "out" / "segments"), nest(images, []), mode="append")
    return root / "out"


def test_report_of_an_all_error_output_lists_the_reasons(tmp_path: Path) -> None:
    out = all_error_output(tmp_path)
    html = tmp_path / "r.html"
    assert main(["--output", str(out), "--html", str(html)]) == 0
    facts = open_page(html, tmp_path / "shot.png")
    assert (facts["counts"]["images.total"], facts["counts"]["images.ok"], facts["counts"]["images.error"]) == \
        ("5", "0", "5")
    # grouped by reason with the URI prefix taken out, most frequent first
    assert facts["errors"] == [["error", "3", "not an image file; recorded as error row"],
                               ["error", "2", "image has 2000000000 pixels, over --max-pixels"]]


def test_proposals_per_image_is_a_real_histogram() -> None:
    from pipeline.report.build import histogram

    one = histogram(np.full(32, 100), 20, integer=True)  # every image capped at 100: one bar, centred on 100
    assert (one["edges"], one["counts"]) == ([99.5, 100.5], [32])
    h = histogram(np.array([0, 1, 1, 2, 39]), 20, integer=True)  # bins of 2 whole numbers: [-0.5, 1.5), ...
    assert h["edges"][:3] == [-0.5, 1.5, 3.5] and h["edges"][-1] == 39.5 and sum(h["counts"]) == 5
    assert h["counts"][0] == 3 and h["counts"][-1] == 1


def test_ar_is_shown_only_for_the_proposals_a_run_kept() -> None:
    from pipeline.report.build import kept_only

    r = {"ar": {"AR@10": 0.5, "AR@100": 0.7, "AR@1000": 0.7, "AR_small@1000": 0.2, "AR_medium@1000": 0.8,
                "AR_large@1000": -1.0}, "dets": 1000}
    assert kept_only(r, 100)["ar"] == {"AR@10": 0.5, "AR@100": 0.7, "AR_small@100": 0.2, "AR_medium@100": 0.8,
                                       "AR_large@100": -1.0}
    assert kept_only(r, 1000)["ar"] == r["ar"] and kept_only(r, None) == r


def test_gallery_labels_do_not_overlap() -> None:
    """Ten proposals sharing one corner: every placed label box is disjoint from every other."""
    from pipeline.report.plots import _free_spot

    placed: list[tuple[float, float, float, float]] = []
    for _ in range(10):
        spot = _free_spot([(10, 10), (10, 30), (60, 10), (10, 60), (60, 60), (35, 35)], 12, 14, (100, 80), placed)
        if spot is not None:
            placed.append((*spot, spot[0] + 12, spot[1] + 14))
    assert len(placed) == 6  # one per candidate place, the rest left to the caption
    for i, a in enumerate(placed):
        assert 0 <= a[0] and a[2] <= 100 and 0 <= a[1] and a[3] <= 80
        for b in placed[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
