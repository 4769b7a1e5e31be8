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
                        "--dry-run", "--variant", "pad+looped-moe", "--variant", "pad", "--train-batch", "2",
                        "--train-batch", "3", "--profile"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    f = rep["faiss"]
    assert "error" not in f, f
    assert f["factory"].startswith("IVF") and f["cpu"]["recall10_rerank8"] >= 0.95
    assert all(f["cpu"][f"qps_batch{b}"] > 0 for b in (1, 64, 1024))
    m = rep["moon"]
    assert "error" not in m, m.get("trace")
    assert m["moe_layers"] == 2 and m["tokens_per_product"] > 4 * 16  # 4 pictures of 16 merged patches + text
    steps = [(r["step"], r["batch"], r["variant"]) for r in m["rows"]]
    assert steps == [("encode", 2, "as built"), ("encode", 4, "as built"), ("train fwd+bwd", 2, "as built"),
                     ("train fwd+bwd", 3, "as built")] + [
        (step, b, v) for v in ("pad+looped-moe", "pad") for step, b in (("encode", 4), ("train fwd+bwd", 2),
                                                                        ("train fwd+bwd", 3))]
    for r in m["rows"]:
        assert r["products_per_s"] > 0 and r["gflop_per_product"] > 0
    # each variant is a set applied to the model as built: the second undoes the first's looped dispatch
    # (the tiny vision MLPs are 60 wide, so 2 are padded)
    assert m["variants"] == ["pad+looped-moe: 2 MLPs padded, 2 MoE layers looped", "pad: 2 MLPs padded"]
    assert 0 < m["split"]["vision_share"] < 1
    prof = m["profile"]
    assert prof["top"] and prof["busy_ms"] > 0 and abs(sum(prof["summary"].values()) - 1) < 0.01
    assert "matrix product" in prof["summary"]


@pytest.mark.slow  # ~15 s: three interpreters each build the tiny model
def test_gpu_check_actors_share_a_device(tmp_path):
    """The actors-per-GPU check starts 1 and then 2 encoder processes together and adds up what they encoded."""
    script = ROOT / "benchmarks" / "gpu_check.py"
    subprocess.run([sys.executable, script, "prepare", "--assets", tmp_path / "assets"], check=True, cwd=ROOT)
    p = subprocess.run([sys.executable, script, "actors", "--assets", tmp_path / "assets", "--out", tmp_path,
                        "--dry-run", "--actors", "1", "--actors", "2", "--reps", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu-actors.json").read_text())["rows"]
    assert [r["actors"] for r in rows] == [1, 2] and all("error" not in r for r in rows), rows
    assert len(rows[1]["per_actor"]) == 2 and all(v > 0 for v in rows[1]["per_actor"])
    assert rows[1]["products_per_s"] > 0 and rows[1]["vs_one"] > 0


@pytest.mark.slow  # ~15 s: generates a small vectors-only world and builds it in a child process
def test_gpu_check_times_moonsearchs_own_vectors_build(tmp_path):
    """The `stream` check builds `moonsearch index --vectors` in a child process per device and searches it
    against exact; on CPU only the CPU build runs, and it must find the exact neighbours."""
    script = ROOT / "benchmarks" / "gpu_check.py"
    p = subprocess.run([sys.executable, script, "stream", "--out", tmp_path, "--dry-run"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "gpu-stream.json").read_text())
    assert "gpu" not in rep and rep["n"] == 6000
    cpu = rep["cpu"]
    assert cpu["gpu_used"] is False and cpu["warnings"] == [] and cpu["build_s"] > 0
    assert cpu["recall10"] >= 0.95 and cpu["p50_ms"] > 0
