"""bench.py --quick runs every CPU measurement in seconds, so the tool cannot rot."""
import json
import subprocess
import sys


def test_quick_bench_measures_everything(repo_root, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out)], cwd=repo_root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    pipeline = figures["input_pipeline"]
    assert pipeline["bare decode (PIL open + RGB)"]["vs_bare"] == 1.0
    assert all(v["images_per_s"] > 0 for v in pipeline.values())
    for arch, row in figures["training"].items():
        assert row["lab_style"] > 0 and row["ours"] > 0 and row["ratio"] == row["ours"] / row["lab_style"]
    for arch, row in figures["models"].items():
        assert row["ours_ms"] > 0 and row["torchvision_ms"] > 0
    assert figures["eval"]["plain"] > figures["eval"]["tta"] > 0
    memory = figures["memory"]
    assert all(v["peak_pss_mb"] > 50 for k, v in memory.items() if k != "ratio")
    assert "### Input pipeline" in result.stdout and "### Peak host memory" in result.stdout
    # the printed tables can be rebuilt from the JSON, which is how BENCHMARKS.md is made
    again = subprocess.run([sys.executable, "bench.py", "--report", str(out)], cwd=repo_root, capture_output=True,
                           text=True, check=True).stdout
    assert again.strip() == result.stdout.strip()
