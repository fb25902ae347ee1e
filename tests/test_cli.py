"""The jobs' command lines follow one convention: console scripts ifcn-<job>, defaults in --help,
no abbreviations, --output for the output folder, comma-separated lists, errors in flag names
(one line, exit 2), and a warning when --scales leave the checkpoint's training range."""
from __future__ import annotations

import importlib
import json
import tomllib
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from jobs._cli import in_flags, trained_scales, warn_scales
from test_show import fake_output

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("_"))


def scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def run_main(job: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    main = importlib.import_module(f"jobs.{job}").main
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_every_job_has_a_console_script() -> None:
    assert JOBS == ["baseline", "check", "demo", "evaluate", "export", "report", "segment", "show", "synth", "train"]
    assert scripts() == {f"ifcn-{j}": f"jobs.{j}:main" for j in JOBS}


@pytest.mark.parametrize("job", JOBS)
def test_help_shows_the_whole_description_and_is_named_as_the_script(job: str, capsys) -> None:
    code, out, _ = run_main(job, ["--help"], capsys)
    assert code == 0 and out.startswith(f"usage: ifcn-{job} ")
    doc = importlib.import_module(f"jobs.{job}").__doc__
    last = [ln for ln in doc.strip().splitlines() if ln.strip()][-1].strip()
    assert last in out  # the docstring's last line: the description is not cut off


def test_segment_help_shows_library_defaults(capsys) -> None:
    _, out, _ = run_main("segment", ["--help"], capsys)
    blocks = {}  # flag -> its help text, joined over wrapped lines
    for line in out.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            blocks[flag] = ""
        if blocks:
            blocks[flag] += " " + line.strip()
    for flag, default in [("--shard-size", "128"), ("--max-pixels", "50000000"), ("--windows-per-scale", "1000"),
                          ("--max-proposals", "1000"), ("--scales", "119,178,267,400,600,900")]:
        assert f"(default: {default})" in " ".join(blocks[flag].split()), blocks[flag]


REQUIRED = ["--input", "in", "--output", "out", "--checkpoint", "c.pt"]


@pytest.mark.parametrize("argv, words", [
    (["--scale", "192"], "unrecognized arguments: --scale 192"),  # no abbreviation of --scales
    (["--nms-iou", "1.5"], "--nms-iou 1.5: must be in (0, 1]"),
    (["--max-proposals", "0"], "--max-proposals and --windows-per-scale must be >= 1"),
    (["--pad-to", "12"], "--pad-to 12: must be 0 or a multiple of 8"),
    (["--scales", "64,big"], "--scales: '64,big': expected comma-separated"),
])
def test_segment_flag_errors_are_one_line_in_flag_names(argv: list[str], words: str, capsys) -> None:
    code, _, err = run_main("segment", REQUIRED + argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0], err
    assert "Config" not in err and lines[0].startswith("ifcn-segment: error: ")


def test_in_flags_turns_fields_into_flags() -> None:
    assert in_flags("InferenceConfig.nms_iou=1.5: must be in (0, 1]", ["nms_iou"]) == "--nms-iou 1.5: must be in (0, 1]"
    assert in_flags("InferenceConfig: max_proposals must be >= 1", ["max_proposals"]) == "--max-proposals must be >= 1"


def test_train_scales_are_comma_separated() -> None:
    from jobs.train import parse_args

    base = ["--images", "i", "--annotations", "a.json", "--output", "o"]
    assert parse_args(base + ["--scales", "192,256"]).scales == (192, 256)
    with pytest.raises(SystemExit):
        parse_args(base + ["--scales", "192", "256"])  # the old space-separated form is an error now


def test_positional_output_still_works_with_a_deprecation_warning(tmp_path: Path, capsys) -> None:
    fake_output(tmp_path)
    out = str(tmp_path / "out")
    png = str(tmp_path / "two.png")
    code, stdout, err = run_main("show", [out, "--image", "two.png", "--out", png], capsys)
    assert code == 0 and "drew 1 of 1 proposals of two.png" in stdout
    assert err.strip() == f"ifcn-show: warning: a positional output is deprecated; pass --output {out}"
    code, stdout2, err = run_main("show", ["--output", out, "--image", "two.png", "--out", png], capsys)
    assert code == 0 and stdout2 == stdout and err == ""
    code, _, err = run_main("show", ["--history"], capsys)
    assert code == 2 and "required: --output" in err and len(err.strip().splitlines()) == 1


def test_scales_outside_the_checkpoints_training_range_warn(capsys) -> None:
    trained = trained_scales(str(REPO / "checkpoints" / "narrow_synth.pt"))
    assert trained == [192, 256, 320, 384]  # what jobs.train recorded (README: the shipped checkpoint)
    text = warn_scales((119, 178, 267, 400, 600, 900), trained)
    assert "119,178,400,600,900 outside the checkpoint's training scales 192,256,320,384" in text
    assert capsys.readouterr().err.strip() == text
    assert warn_scales((192, 384), trained) is None and warn_scales((119,), None) is None


def test_export_writes_coco_results_pycocotools_loads(tmp_path: Path, capsys) -> None:
    """test_show's fake output: a/one.png has 3 proposals, two.png 1, bad.jpg is an error row."""
    fake_output(tmp_path)
    gt = {"images": [{"id": 7, "file_name": "a/one.png", "height": 96, "width": 128},
                     {"id": 9, "file_name": "two.png", "height": 96, "width": 128}],
          "categories": [{"id": 1, "name": "object"}], "annotations": []}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    res = tmp_path / "res.json"
    code, out, _ = run_main("export", ["--output", str(tmp_path / "out"), "--annotations", str(tmp_path / "gt.json"),
                                       "--json", str(res)], capsys)
    assert code == 0 and "wrote 4 results of 2 images" in out
    coco = COCO(str(tmp_path / "gt.json"))
    dets = coco.loadRes(str(res))
    anns = dets.loadAnns(dets.getAnnIds())
    assert sorted((a["image_id"], round(a["score"], 3)) for a in anns) == [(7, 0.3), (7, 0.6), (7, 0.9), (9, 0.8)]
    best = next(a for a in anns if a["image_id"] == 7 and a["score"] > 0.85)
    assert list(best["bbox"]) == [10, 10, 50, 30] and best["area"] == 30 * 50  # the rectangle (10,40,10,60)
    # --max-proposals 1 and no annotations: ids 1..N in image_id order, the index beside the results
    code, out, _ = run_main("export", ["--output", str(tmp_path / "out"), "--json", str(res), "--max-proposals", "1"],
                            capsys)
    assert code == 0 and "wrote 2 results of 2 images" in out
    index = tmp_path / "res.images.json"
    assert [i["file_name"] for i in json.loads(index.read_text())["images"]] == ["a/one.png", "two.png"]
    dets = COCO(str(index)).loadRes(str(res))
    assert sorted((a["image_id"], round(a["score"], 3)) for a in dets.loadAnns(dets.getAnnIds())) == [(1, 0.9), (2, 0.8)]
