"""bench/gpu.py runs on CPU (`--device cpu`), tiny: parts 1, 2 and 4, the actor's concurrent calls with
their overlap share (CPU figures, not GPU ones: the script says so).

Run: pytest tests/test_bench_gpu.py -q
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_tiny_on_cpu_and_prints_the_overlap_share(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu_script", REPO / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--num-images", "2", "--size", "64x64", "--max-proposals", "10",
                     "--skip-counts", "--skip-pipeline", "--skip-big-image", "--actor-seconds", "0.3",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == gpu.NO_CUDA_LINE
    assert "overlap of the 2 concurrent calls" in text and "CPU figures" in text
    results = json.loads(out.read_text())
    rows = results["actor"]
    assert {(r["heads"], r["nms"], r["postprocess_on"]) for r in rows} == {
        (h, n, on) for h in ("structured", "random") for n in ("box", "mask") for on in ("numpy", "device")}
    for r in rows:
        assert r["calls"] >= 2 and r["host_ms"] > 0 and 0.0 <= r["overlap_share"] <= 1.0
        assert r["postprocess_ms"] > 0 and 0 < r["device_busy"] <= 1.0  # each moment of the device once
    assert all("actor overlap % (device)" in row for row in results["summary"])
