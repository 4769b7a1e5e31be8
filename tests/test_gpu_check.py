"""benchmarks/gpu_check.py on CPU with tiny shapes, so the GPU script never rots between GPU sessions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~17 s (two interpreters): make test-slow, which CI runs after make test
def test_gpu_check_dry_run_measures_faiss_and_moon(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.py"
    subprocess.run([sys.executable, script, "prepare", "--assets", tmp_path / "assets"], check=True, cwd=ROOT)
    p = subprocess.run([sys.executable, script, "run", "--assets", tmp_path / "assets", "--out", tmp_path / "out",
                        "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    f = rep["faiss"]
    assert "error" not in f, f
    assert f["factory"].startswith("IVF") and f["cpu"]["recall10_rerank8"] >= 0.95
    assert all(f["cpu"][f"qps_batch{b}"] > 0 for b in (1, 64, 1024))
    m = rep["moon"]
    assert "error" not in m, m.get("trace")
    assert m["moe_layers"] == 2 and m["tokens_per_product"] > 4 * 16  # 4 pictures of 16 merged patches + text
    steps = [(r["step"], r["batch"]) for r in m["rows"]]
    assert steps == [("encode", 2), ("encode", 4), ("train fwd+bwd", 2)]
    for r in m["rows"]:
        assert r["products_per_s"] > 0 and r["gflop_per_product"] > 0
