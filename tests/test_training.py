"""The trainer's pieces on hand-computed cases, and real short runs of the tiny MOON."""
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moonsearch.training.losses import false_negative_mask, info_nce
from moonsearch.training.queue import NegativeQueue, id_hash
from moonsearch.training.sampler import UniqueBatchSampler


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    loss = info_nce(q, p, torch.tensor([0, 1]), None, t)
    l0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0.6 / t)))
    l1 = -math.log(math.exp(0.8 / t) / (math.exp(0.0 / t) + math.exp(0.8 / t)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_false_negatives_are_masked_by_item_and_group():
    # query 0 bought item A (group G); candidates: A (its positive), A again (queued copy), B of group G, C
    pos_item = torch.tensor([id_hash("A")])
    pos_group = torch.tensor([id_hash("G")])
    cand_item = torch.tensor([id_hash("A"), id_hash("A"), id_hash("B"), id_hash("C")])
    cand_group = torch.tensor([id_hash("G"), id_hash("G"), id_hash("G"), id_hash("H")])
    m = false_negative_mask(pos_item, pos_group, cand_item, cand_group, torch.tensor([0]))
    assert m.tolist() == [[False, True, True, False]]
    m_items = false_negative_mask(pos_item, pos_group, cand_item, cand_group, torch.tensor([0]), mask_groups=False)
    assert m_items.tolist() == [[False, True, False, False]]
    # masked candidates do not change the loss, however similar they are
    q = F.normalize(torch.tensor([[1.0, 0.2]]), dim=-1)
    p = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.21], [1.0, 0.19], [0.0, 1.0]]), dim=-1)
    full = info_nce(q, p, torch.tensor([0]), m, 0.1)
    only = info_nce(q, p[[0, 3]], torch.tensor([0]), None, 0.1)
    assert full.item() == pytest.approx(only.item(), rel=1e-6)


def test_queue_keeps_the_latest_and_is_a_buffer():
    qu = NegativeQueue(5, 2)
    for step in range(3):
        v = torch.full((2, 2), float(step))
        qu.push(v, torch.tensor([10 * step, 10 * step + 1]), torch.tensor([step, step]))
    vec, items, groups = qu.contents()
    assert len(vec) == 5 and int(qu.ptr) == 1
    assert sorted(items.tolist()) == [1, 10, 11, 20, 21]  # the oldest entry (item 0) was overwritten
    assert "vectors" in qu.state_dict() and "items" in qu.state_dict()


def test_batches_never_repeat_an_item_or_group():
    items = [f"i{k % 30}" for k in range(200)]
    groups = [f"g{k % 10}" for k in range(200)]
    s = UniqueBatchSampler(items, groups, batch_size=8, seed=1)
    batches = s.batches(0)
    assert batches and all(len({groups[i] for i in b}) == len(b) == 8 for b in batches)
    assert s.batches(0) == batches and s.batches(1) != batches  # deterministic per epoch
    halves = [list(UniqueBatchSampler(items, groups, 8, 1, rank=r, world_size=2)(0))[0] for r in (0, 1)]
    assert halves[0] + halves[1] == batches[0]


def _gather_worker(rank, world, init, out):
    import torch.distributed as dist

    from moonsearch.training.distributed import all_gather_with_grad

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    allx = all_gather_with_grad(x)
    allx.sum().backward()
    torch.save({"all": allx.detach(), "grad": x.grad}, os.path.join(out, f"r{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_see_each_others_negatives(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        got = torch.load(tmp_path / f"r{r}.pt", weights_only=True)
        assert got["all"][:, 0].tolist() == [1, 1, 2, 2]  # both ranks' products, in rank order
        assert torch.equal(got["grad"], torch.ones(2, 3))  # the local slice keeps its gradient


@pytest.fixture(scope="module")
def train_cfg(world, tmp_path_factory):
    from moonsearch.trainer.config import load_config

    return load_config("moon-tiny-test", data=str(world), out=str(tmp_path_factory.mktemp("runs")), steps=8,
                       val_every=0, ckpt_every=2, val_pool=40)


def test_short_training_improves_validation_recall_and_checkpoint_indexes(train_cfg, world, tmp_path):
    import json

    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.models.base import create_encoder
    from moonsearch.search.service import SearchService
    from moonsearch.trainer.loop import train

    final = train(train_cfg)
    rows = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_recall@10" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 8
    assert val[-1]["val_recall@10"] > val[0]["val_recall@10"]
    assert (final.parent / "loss.png").exists() and (final.parent / "config.yaml").exists()
    assert {"fwd_bwd_s", "forward_s", "backward_s", "opt_s", "samples_per_s", "loss", "lr"} <= set(rows[1])
    enc = create_encoder(f"moon:{final}")
    run_index(IndexJob(world / "catalog.parquet", tmp_path / "idx", model=f"moon:{final}"), encoder=enc)
    assert len(SearchService(tmp_path / "idx").search_text("blue backpack", k=5)) == 5


def test_resume_gives_the_same_next_batch_and_weights(train_cfg, tmp_path):
    from moonsearch.trainer.loop import Trainer, train

    cfg = replace(train_cfg, out=str(tmp_path / "a"), steps=4)
    train(cfg, stop_after=2)  # interrupted after 2 steps (a checkpoint was written at step 2)
    resumed = Trainer(cfg)
    assert resumed.load_state() and resumed.step == 2
    straight = Trainer(replace(cfg, out=str(tmp_path / "b")))
    for _ in range(2):
        straight.train_step()
    assert [p.item_id for p in resumed.batch_at(2)] == [p.item_id for p in straight.batch_at(2)]
    for (n, a), (_, b) in zip(resumed.model.state_dict().items(), straight.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n
    qa, qb = resumed.queue.contents()[1], straight.queue.contents()[1]
    assert torch.equal(qa, qb)
    ma, mb = resumed.train_step(), straight.train_step()
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-4)


def test_mbe_layout_converts_and_zero_shot_runs(tmp_path, clip_tiny):
    """A small file in the MBE layout, written here, through the converter and the zero-shot table."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from typer.testing import CliRunner

    from moonsearch.cli import app

    Image.new("RGB", (40, 40), (200, 0, 0)).save(tmp_path / "a.jpg")
    rows = {"doc_title": ["red cotton dress", "blue steel mug", "green dress"],
            "doc_image": ["a.jpg", "a.jpg", None],
            "doc_industry_name": ["apparel", "home", "apparel"], "doc_cate1_name": ["dresses", "kitchen", "dresses"],
            "doc_cate2_name": ["midi", "mugs", "midi"], "doc_cate3_name": [None, "", None],
            "doc_cate4_name": [None, None, None],
            "doc_attributes": ["颜色:红色;材质:棉", '{"colour": "blue", "material": "steel"}', "colour:green"]}
    pq.write_table(pa.table(rows), tmp_path / "mbe.parquet")
    res = CliRunner().invoke(app, ["convert-mbe", str(tmp_path / "mbe.parquet"), "--out", str(tmp_path / "cat")])
    assert res.exit_code == 0, res.output
    cat = pq.read_table(tmp_path / "cat" / "catalog.parquet").to_pylist()
    assert cat[0]["category"] == ["apparel", "dresses", "midi"] and cat[1]["category"] == ["home", "kitchen", "mugs"]
    assert dict(cat[0]["attributes"]) == {"颜色": "红色", "材质": "棉"} and dict(cat[1]["attributes"])["colour"] == "blue"
    assert cat[0]["images"][0].endswith("a.jpg") and cat[2]["images"] == []
    res = CliRunner().invoke(app, ["bench", "zero-shot", "--data", str(tmp_path / "cat"), "--model", "clip-tiny",
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "classification level 1" in res.output and (tmp_path / "b" / "zero-shot.png").exists()
