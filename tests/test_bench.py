"""bench.py: the timing helpers against known durations, and --quick running every CPU measurement."""
import json
import math
import subprocess
import sys
import time

import pytest

import bench


def test_interleaved_rates_measure_known_durations():
    # 20 "items" in 20 ms and in 40 ms: 1000 and 500 items/s, whatever the order they run in
    rates = bench.interleaved_rates({"fast": lambda: time.sleep(0.02), "slow": lambda: time.sleep(0.04)},
                                    count=20, rounds=5)
    assert rates["fast"] == pytest.approx(1000, rel=0.25)
    assert rates["slow"] == pytest.approx(500, rel=0.25)
    assert bench.median_rate(lambda: time.sleep(0.01), count=1, rounds=3) == pytest.approx(100, rel=0.3)


def test_quick_bench_measures_everything(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out)], cwd=repo_root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    pipeline = figures["input_pipeline"]
    rates = {name: row["images_per_s"] for name, row in pipeline.items()}
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    # the rows time different work: a rotation on the CPU costs several times the decoding (measured 5x)
    assert rates["ours + rotation on the CPU"] < rates["ours, per image (Dataset items)"]
    for row in figures["training"].values():
        assert row["lab_style"] > 0 and row["ours"] > 0 and row["ours_nchw"] > 0
    for row in figures["models"].values():
        # the same weights and the same step: within a factor 2 even on a busy machine (1.00 measured)
        assert 0.5 < row["ours_ms"] / row["torchvision_ms"] < 2
    assert figures["eval"]["plain"] > figures["eval"]["tta"] > 0  # TTA does 8 forward passes per image
    memory = figures["memory"]
    assert all(v["peak_pss_mb"] > 50 for k, v in memory.items() if k != "ratio")
    camera = figures["camera"]
    assert all(math.isfinite(v) and v > 0 for k, v in camera.items() if k != "decoded")
    # the two modes decode what they say: the 12 MP frame whole, and at a reduced DCT scale (1/4 for 512 px)
    assert camera["decoded"]["full"] == list(bench.CAMERA_SIZE)
    assert camera["decoded"]["draft"] == [s // 4 for s in bench.CAMERA_SIZE]
    assert "### Input pipeline" in result.stdout and "### Peak host memory" in result.stdout
    # the printed tables can be rebuilt from the JSON, which is how BENCHMARKS.md is made
    again = subprocess.run([sys.executable, "bench.py", "--report", str(out)], cwd=repo_root, capture_output=True,
                           text=True, check=True).stdout
    assert again.strip() == result.stdout.strip()


def test_quick_export_table_times_every_runner(repo_root, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "export.json"
    result = subprocess.run([sys.executable, "bench.py", "--export", "--quick", "--out", str(out)], cwd=repo_root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["export"]["rows"]
    assert [(r["arch"], r["size"], r["batch"]) for r in rows] == [("resnet18", 64, 1), ("resnet18", 64, 4)]
    for row in rows:
        assert set(row["ms_per_image"]) == {bench.EAGER, bench.EAGER_CL, bench.FP32, bench.INT8_STATIC,
                                            bench.INT8_DYNAMIC}
        assert all(math.isfinite(v) and v > 0 for v in row["ms_per_image"].values())
    assert "### Deployment on this CPU" in result.stdout and "INT8 static vs fp32" in result.stdout
    again = subprocess.run([sys.executable, "bench.py", "--report", str(out)], cwd=repo_root, capture_output=True,
                           text=True, check=True).stdout
    assert again.strip() == result.stdout.strip()
