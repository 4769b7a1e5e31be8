"""Indexing on Ray gives the index a single process gives: same items per category, same vectors (within
float16), same search results, same reported problems. A real local Ray cluster per module, and one test
that starts 'ray start --head', joins a second worker node to it and indexes through its address."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from moonsearch.index.index_set import IndexSet  # noqa: E402
from moonsearch.indexer.run import IndexJob, run_index  # noqa: E402
from moonsearch.search.service import SearchService  # noqa: E402


@pytest.fixture(scope="module")
def _ray_module():
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_ray_module):
    """The module's local Ray cluster: started on first use, and again after a test that had to leave it."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2 ** 20, log_to_driver=False,
                 configure_logging=False)


@pytest.fixture(scope="module")
def catalog(world, tmp_path_factory):
    """The test world plus two rows with a broken image and a missing one, so problems travel too."""
    folder = tmp_path_factory.mktemp("raycat")
    t = pq.read_table(world / "catalog.parquet")
    rows = t.slice(0, 2).to_pylist()
    rows[0]["item_id"], rows[0]["images"] = "BROKEN-1", [str(folder / "missing.jpg")]
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    rows[1]["item_id"], rows[1]["images"] = "BROKEN-2", [str(folder / "bad.jpg")] + list(rows[1]["images"])
    pq.write_table(pa.concat_tables([t, pa.Table.from_pylist(rows, schema=t.schema)]), folder / "catalog.parquet")
    if (world / "images").exists() and not (folder / "images").exists():  # relative image paths resolve
        os.symlink(world / "images", folder / "images")
    return folder / "catalog.parquet"


def _vectors(index_dir: Path) -> dict[str, np.ndarray]:
    iset = IndexSet.load(index_dir)
    out = {}
    for c in iset.categories.values():
        for r, item in enumerate(c.meta.column("item_id").to_pylist()):
            out[item] = np.asarray(c.vectors[r], np.float32)
    return out


def _same_index(a: Path, b: Path, encoder):
    ia, ib = IndexSet.load(a), IndexSet.load(b)
    assert {s: sorted(c.meta.column("item_id").to_pylist()) for s, c in ia.categories.items()} == \
           {s: sorted(c.meta.column("item_id").to_pylist()) for s, c in ib.categories.items()}
    va, vb = _vectors(a), _vectors(b)
    assert va.keys() == vb.keys()
    assert max(float(np.abs(va[k] - vb[k]).max()) for k in va) < 2e-3  # float16 storage
    sa, sb = SearchService(a, encoder=encoder), SearchService(b, encoder=encoder)
    for q in ("red sneakers", "leather handbag", "blue wristwatch", "wool scarf"):
        assert [h.item_id for h in sa.search(q, k=10).hits] == [h.item_id for h in sb.search(q, k=10).hits]


def test_ray_index_equals_single_process(local_ray, catalog, clip_tiny, tmp_path):
    local = run_index(IndexJob(catalog, tmp_path / "local", model="clip-tiny"), encoder=clip_tiny)
    job = IndexJob(catalog, tmp_path / "ray", model="clip-tiny", ray="auto", ray_actors=2, batch_size=16)
    ticks = []
    dist = run_index(job, encoder=clip_tiny, progress=lambda total: ticks.append)
    assert dist.ray["actors"] == 2 and dist.ray["cpus"] == 2
    assert dist.embedded == local.embedded == local.indexed
    _same_index(tmp_path / "local", tmp_path / "ray", clip_tiny)
    key = lambda p: (p.row, p.item_id, p.field, p.action)  # noqa: E731
    assert sorted(map(key, dist.problems)) == sorted(map(key, local.problems))
    assert {p.item_id for p in dist.problems} >= {"BROKEN-1", "BROKEN-2"}
    # a re-run embeds nothing (the cache), and still reports the image problems
    again = run_index(IndexJob(catalog, tmp_path / "ray", model="clip-tiny", ray="auto"), encoder=clip_tiny)
    assert again.embedded == 0 and again.cached == local.indexed
    assert sorted(map(key, again.problems)) == sorted(map(key, local.problems))


@pytest.mark.slow  # ~19 s: make test-slow, which CI runs after make test
def test_an_encoder_actor_killed_mid_run_loses_nothing(local_ray, catalog, clip_tiny, tmp_path):
    """SIGKILL one encoder actor's process while the catalog is being embedded: Ray Data restarts it and
    retries its batch, or the run fails and a re-run resumes from the embedding cache. Either way every
    product ends up indexed exactly as a single process indexes it, with the same problems reported."""
    import signal
    import threading
    import time

    from ray._private import state

    local = run_index(IndexJob(catalog, tmp_path / "local", model="clip-tiny"), encoder=clip_tiny)
    job = IndexJob(catalog, tmp_path / "ray", model="clip-tiny", ray="auto", ray_actors=2, batch_size=2)
    done: dict = {}
    seen = []

    def run():
        try:
            done["report"] = run_index(job, encoder=clip_tiny, progress=lambda total: seen.append)
        except Exception as e:  # the run may fail outright: then it must resume
            done["error"] = e

    t = threading.Thread(target=run)
    t.start()
    killed = None
    deadline = time.time() + 300
    while t.is_alive() and time.time() < deadline and killed is None:
        actors = [a for a in state.actors().values()
                  if "EmbedActor" in str(a.get("ActorClassName", "")) and a.get("State") == "ALIVE" and a.get("Pid")]
        if actors and len(seen) >= 1:
            killed = actors[0]["Pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    t.join(600)
    assert killed is not None, "the run finished before an encoder actor could be killed"
    if "error" in done:  # resume: only what the cache lacks is embedded again
        again = run_index(IndexJob(catalog, tmp_path / "ray", model="clip-tiny", ray="auto", ray_actors=2),
                          encoder=clip_tiny)
        assert again.cached + again.embedded == local.indexed and again.cached > 0
    _same_index(tmp_path / "local", tmp_path / "ray", clip_tiny)
    key = lambda p: (p.row, p.item_id, p.field, p.action)  # noqa: E731
    final = run_index(IndexJob(catalog, tmp_path / "ray", model="clip-tiny", ray="auto"), encoder=clip_tiny)
    assert final.embedded == 0 and sorted(map(key, final.problems)) == sorted(map(key, local.problems))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_index_through_a_started_cluster_with_two_nodes(world, clip_tiny, tmp_path):
    """As on a real cluster: 'ray start --head', a second node joins by address, the CLI indexes with
    --ray ADDRESS; the index equals the single-process one."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    # a loopback test cluster: no token to hand around (a real cluster keeps Ray's token auth on)
    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    tmp = Path(f"/tmp/ms-ray-{port}")  # ray's socket paths must stay short
    # 'ray stop --force' below ends every Ray process on this machine, the module's local cluster too, and
    # a driver whose cluster dies is ended with it: leave that cluster first (local_ray starts it again)
    if ray.is_initialized():
        ray.shutdown()
    try:
        # each node keeps a CPU beside its actor: Ray Data's own tasks take a whole one
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                        "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}", "--object-store-memory=100000000"],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address={addr}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                        "--object-store-memory=100000000"], check=True, env=env, capture_output=True, timeout=120)
        cli = [sys.executable, "-m", "moonsearch.cli"]
        p = subprocess.run(cli + ["index", str(world / "catalog.parquet"), "--out", str(tmp_path / "ray"),
                                  "--model", "clip-tiny", "--ray", addr, "--ray-actors", "2"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        assert "2 encoder actors" in p.stdout and "4 CPUs" in p.stdout
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    run_index(IndexJob(world / "catalog.parquet", tmp_path / "local", model="clip-tiny"), encoder=clip_tiny)
    _same_index(tmp_path / "local", tmp_path / "ray", clip_tiny)
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text())["count"] == 120
