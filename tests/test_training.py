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


def _reduce_worker(rank, world, init, out):
    from datetime import timedelta

    import torch.distributed as dist

    from moonsearch.training.distributed import all_reduce_gradients

    # a short timeout: ranks issuing different collectives fail the test instead of hanging it
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    if rank == 0:  # an "expert" that received tokens on rank 0 only
        a.grad = torch.full((3,), 4.0)
    c.grad = torch.full((3,), float(rank + 1))  # every rank
    all_reduce_gradients([a, b, c], bucket_elems=4)  # small buckets: several collectives per call
    torch.save({"a": a.grad, "b_none": b.grad is None, "c": c.grad}, os.path.join(out, f"g{rank}.pt"))
    dist.destroy_process_group()


def test_gradient_averaging_survives_parameters_without_gradient_on_one_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_reduce_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        got = torch.load(tmp_path / f"g{r}.pt", weights_only=True)
        assert got["a"].tolist() == [2.0] * 3  # (4 + 0) / 2 on both ranks
        assert got["b_none"]  # no rank touched it: it stays None, the optimiser skips it
        assert got["c"].tolist() == [1.5] * 3


def test_the_trainer_builds_each_epoch_once(train_cfg):
    from moonsearch.trainer.loop import Trainer

    tr = Trainer(replace(train_cfg, batch_size=8))
    per_epoch = tr._epoch_len(0)
    for step in range(per_epoch + 3):  # all of epoch 0, into epoch 1
        tr.batch_at(step)
    assert tr.sampler.builds == 2, tr.sampler.builds


@pytest.fixture(scope="module")
def train_cfg(world, tmp_path_factory):
    from moonsearch.trainer.config import load_config

    return load_config("moon-tiny-test", data=str(world), out=str(tmp_path_factory.mktemp("runs")), steps=16,
                       val_every=0, ckpt_every=2, val_pool=40, val_fraction=0.25)


def test_short_training_improves_validation_recall_and_checkpoint_indexes(train_cfg, world, tmp_path):
    import json

    from moonsearch.indexer.run import IndexJob, run_index
    from moonsearch.models.base import create_encoder
    from moonsearch.search.service import SearchService
    from moonsearch.trainer.loop import train

    final = train(train_cfg)
    rows = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_recall@10" in r]
    assert val[0]["step"] == 0 and val[-1]["step"] == 16
    assert val[-1]["val_recall@10"] > val[0]["val_recall@10"]
    assert (final.parent / "loss.png").exists() and (final.parent / "config.yaml").exists()
    assert {"step_s", "data_s", "forward_s", "backward_s", "opt_s", "samples_per_s", "loss", "lr"} <= set(rows[1])
    enc = create_encoder(f"moon:{final}")
    assert create_encoder(str(final)).fingerprint == enc.fingerprint  # the bare run folder works too
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        create_encoder(str(tmp_path))
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


def _train_worker(rank, world, init, cfg, out):
    import json

    import torch.distributed as dist

    from datetime import timedelta

    from moonsearch.trainer.loop import Trainer

    # a timeout: ranks issuing different collectives fail the test instead of hanging it
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    tr = Trainer(cfg)
    rows = [tr.train_step() for _ in range(2)]
    state = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    torch.save(state, os.path.join(out, f"w{rank}.pt"))
    items = [p.item_id for p in tr.batch_at(0)]
    with open(os.path.join(out, f"m{rank}.json"), "w") as f:
        json.dump({"candidates": [r["candidates"] for r in rows], "items": items}, f)
    dist.destroy_process_group()


def test_two_gloo_trainer_processes_share_negatives_and_stay_in_step(train_cfg, tmp_path):
    """The whole trainer in 2 gloo processes: each rank scores its queries against both ranks' products,
    the queue fills with both ranks' products, and gradients are averaged so the weights stay equal."""
    import json

    import torch.multiprocessing as mp

    cfg = replace(train_cfg, out=str(tmp_path / "runs"), batch_size=8, queue_size=32, hard_negatives=False)
    mp.spawn(_train_worker, args=(2, f"file://{tmp_path}/init", cfg, str(tmp_path)), nprocs=2, join=True)
    m = [json.loads((tmp_path / f"m{r}.json").read_text()) for r in (0, 1)]
    # 4 local queries per rank; step 1: 8 gathered products; step 2: 8 gathered + 8 queued
    assert m[0]["candidates"] == m[1]["candidates"] == [8, 16]
    assert not set(m[0]["items"]) & set(m[1]["items"])  # each rank has its own share of the batch
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in (0, 1))
    init = __import__("moonsearch.models.base", fromlist=["x"]).create_encoder("moon-tiny").model.state_dict()
    moved = [k for k in w0 if not torch.equal(w0[k], init[k])]
    assert moved  # training changed the weights ...
    for k in w0:  # ... identically on both ranks
        assert torch.allclose(w0[k], w1[k], atol=1e-6), k


def test_two_gloo_ranks_with_hard_negatives_and_queue_on_single_group_leaves(train_cfg, world, tmp_path):
    """Leaf categories whose items all share one group have no hard negative: each rank still gathers
    as many products as the others (a random other-group product stands in), so the all-gather and
    the positive offsets agree and training goes on in step."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch.multiprocessing as mp

    data = tmp_path / "data"
    data.mkdir()
    cat = pq.read_table(world / "catalog.parquet")
    rows = cat.to_pylist()
    leaves = sorted({tuple(r["category"]) for r in rows})
    single = set(leaves[::2])  # every other leaf: one group for the whole leaf
    groups = [f"leaf:{'/'.join(r['category'])}" if tuple(r["category"]) in single else r["group_id"] for r in rows]
    pq.write_table(cat.set_column(cat.schema.get_field_index("group_id"), "group_id", pa.array(groups)),
                   data / "catalog.parquet")
    beh = pq.read_table(world / "behavior.parquet")
    pq.write_table(beh, data / "behavior.parquet")
    for f in world.iterdir():
        if f.is_dir():
            (data / f.name).symlink_to(f)
    cfg = replace(train_cfg, data=str(data), out=str(tmp_path / "runs"), batch_size=8, queue_size=32,
                  hard_negatives=True, hard_negative_index="")
    mp.spawn(_train_worker, args=(2, f"file://{tmp_path}/init", cfg, str(tmp_path)), nprocs=2, join=True)
    m = [json.loads((tmp_path / f"m{r}.json").read_text()) for r in (0, 1)]
    # 4 queries + 4 hard negatives per rank: step 1 scores 16 gathered products, step 2 16 + 16 queued
    assert m[0]["candidates"] == m[1]["candidates"] == [16, 32]
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in (0, 1))
    for k in w0:
        assert torch.allclose(w0[k], w1[k], atol=1e-6), k


def test_clip_baselines_train_with_the_same_loop(world, clip_mini, tmp_path):
    """clip-finetune: clip-mini's heads learn with the MOON objective and reload as clip-mini:<folder>;
    an open_clip model (clip-tiny) trains end to end and reloads as clip:<folder>."""
    import numpy as np

    from moonsearch.models.base import Query, create_encoder
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import train

    cfg = load_config("clip-finetune", data=str(world), out=str(tmp_path), steps=6, val_every=0, ckpt_every=3,
                      val_pool=40, lr=2e-3)
    final = train(cfg)
    tuned = create_encoder(f"clip-mini:{final}")
    q = [Query("red backpack"), Query("blue sneakers")]
    assert tuned.encode_queries(q).shape == (2, clip_mini.dim)
    assert not np.allclose(tuned.encode_queries(q), clip_mini.encode_queries(q), atol=1e-4)
    assert tuned.fingerprint != clip_mini.fingerprint

    final = train(replace(cfg, model="clip-tiny", run_name="clip-tiny-ft", steps=3))
    a = create_encoder(f"clip:{final}")
    b = create_encoder("clip-tiny")
    assert not np.allclose(a.encode_queries(q), b.encode_queries(q), atol=1e-5)


def test_trained_only_checkpoint_is_small_and_reloads_exactly(world, tmp_path):
    """moon-mini's publishing path: only the tensors training changed are stored, the rest is rebuilt
    from the packaged weights, and the vectors are the trained model's."""
    import numpy as np

    from moonsearch.models.base import Query, create_encoder
    from moonsearch.models.moon.encoder import load_pretrained
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import Trainer

    cfg = load_config("moon-tiny-test", data=str(world), out=str(tmp_path), trainable="experts+lora", lora_rank=4,
                      model_options={"moe": {"low_rank": 8}})
    tr = Trainer(cfg)
    tr.train_step()
    tr.tm.save(tmp_path / "ck", meta={})
    full = tmp_path / "full"
    __import__("moonsearch.models.moon.encoder", fromlist=["x"]).save_pretrained(tr.model, full)
    small, big = (tmp_path / "ck" / "model.safetensors").stat().st_size, (full / "model.safetensors").stat().st_size
    assert small < big / 3
    re = create_encoder(f"moon:{tmp_path / 'ck'}")
    q = [Query("red backpack"), Query("blue shoe")]
    assert np.allclose(re.encode_queries(q), tr.enc.encode_queries(q), atol=1e-5)
    assert np.allclose(load_pretrained(full).encode_queries(q), re.encode_queries(q), atol=1e-5)


def test_ablation_presets_change_what_they_say(world):
    import dataclasses

    from PIL import Image

    from moonsearch.models.moon import builtin_config
    from moonsearch.models.moon.encoder import fresh_encoder
    from moonsearch.models.moon.tokens import product_segments
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.models import _with_options

    base = load_config("moon-mini-cpu")
    assert load_config("clip-finetune").model_options == {}  # cleared: they configure MOON models
    for name, check in [("moon-mini-no-moe", lambda c: not c.use_moe), ("moon-mini-no-crops", lambda c: not c.use_crops),
                        ("moon-mini-unguided", lambda c: not c.moe.guided and c.moe.low_rank == 32)]:
        cfg = load_config(name)
        assert cfg.steps == base.steps and cfg.lr == base.lr and cfg.run_name == name  # inherited budget
        assert check(_with_options(builtin_config("moon-mini-base"), cfg.model_options))
        # an ablation changes its model options and its name, nothing else (same data, budget, negatives)
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
        assert changed == {"run_name", "model_options"}, changed
    ib = load_config("moon-mini-in-batch")
    assert not ib.hard_negatives and ib.queue_size == 0 and ib.in_batch
    # unguided routing: category and attribute tokens go through the gate to the general experts
    img = Image.new("RGB", (56, 56), (200, 30, 30))
    for guided in (True, False):
        enc = fresh_encoder(_with_options(builtin_config("moon-tiny"), {"moe": {"guided": guided}}), "t")
        enc.model.routing_stats(reset=True)
        with torch.no_grad():
            enc.model([product_segments("red shoe", ["shoes", "sneakers"], {"colour": "red"}, [img], None)])
        counts = enc.model.routing_stats()["layer0"]
        assert (counts[0] > 0) == guided and (counts[1] > 0) == guided


@pytest.mark.parametrize("preset,options", [
    ("moon-tiny-test", {"visual_product": 0.7071, "text_block": 0.55, "pool": "blocks"}),
    ("clip-finetune", {}),
])
def test_served_loss_trains_on_the_vectors_search_serves(world, tmp_path, preset, options):
    """served_loss: what the loss scores is, row for row, what encode_products / encode_queries return
    (trained part inside the fixed visual and text blocks, a product without photos at its served norm),
    and a step moves the trained part only."""
    import numpy as np

    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import Trainer

    cfg = load_config(preset, data=str(world), out=str(tmp_path), steps=2, val_every=0, served_loss=True,
                      batch_size=8, **({"model_options": options} if options else {}))
    tr = Trainer(cfg)
    assert tr.tm.dim == tr.enc.dim > tr.enc.semantic_dim  # the queue holds served vectors
    recs = list(tr.batches.records)[:5]
    products = [tr.batches.product(i, bare) for i, bare in zip(recs, [False, True, False, False, False])]
    products[2] = replace(products[2], images=[])  # no photos: served at norm < 1, and trained so
    queries = [tr.batches.query(p) for p in tr.train_pairs]
    queries = [q for q in queries if q.image is not None][:2] + [q for q in queries if q.image is None][:2]
    assert len(queries) == 4
    tr.model.eval()
    with torch.no_grad():
        p_served = tr.tm.products(products)[0].float().numpy()
        q_served = tr.tm.queries(queries)[0].float().numpy()
    assert np.allclose(p_served, tr.enc.encode_products(products), atol=1e-5)
    assert np.allclose(q_served, tr.enc.encode_queries(queries), atol=1e-5)
    norms = np.linalg.norm(p_served, axis=1)
    assert norms[2] < 0.99 and np.allclose(np.delete(norms, 2), 1, atol=1e-4)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    m = tr.train_step()
    assert math.isfinite(m["loss"])
    moved = [n for n, p in tr.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
    tr.model.eval()
    with torch.no_grad():  # the fixed blocks stay as they were: only the trained part's columns change
        after = tr.tm.products(products)[0].float().numpy()
    fixed = slice(tr.enc.semantic_dim, None)  # [trained part, visual block, text block]
    assert np.allclose(after[:, fixed], p_served[:, fixed], atol=1e-6)
    assert not np.allclose(after, p_served, atol=1e-4)


def test_the_deep_preset_keeps_more_smollm2_layers_and_its_checkpoint_rebuilds_them(tmp_path):
    """moon-mini-deep (issue 9's deeper-cut lever) changes the cut and the budget of the 400-step control
    only; every kept layer gets guided experts, and a trained-only checkpoint of it loads back at that
    depth with the same vectors (a 6-layer rebuild would drop three layers' experts by name)."""
    import dataclasses
    import json

    import numpy as np

    from moonsearch.errors import UserError
    from moonsearch.models.base import Product
    from moonsearch.models.moon import builtin_config
    from moonsearch.models.moon.encoder import MoonEncoder, build_model, load_pretrained, save_pretrained
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.models import _with_options

    cfg, base = load_config("moon-mini-deep"), load_config("moon-mini-cpu")
    changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
    assert changed == {"run_name", "steps", "model_options"} and cfg.steps == 400
    mc = replace(_with_options(builtin_config("moon-mini-base"), cfg.model_options), lora_rank=4)
    assert mc.num_layers == 9 and builtin_config("moon-mini-base").num_layers == 6
    model = build_model(mc)
    assert len(model.adapter.decoder_layers()) == 9 == len(model.moe_layers)
    assert model.adapter.lm.config.num_hidden_layers == 9
    with torch.no_grad():  # as if trained: the last kept layer's experts move away from their init
        for p in model.moe_layers[8].parameters():
            if p.requires_grad:
                p.add_(0.05)
    folder = save_pretrained(model, tmp_path / "deep", trained_only=True)
    enc = load_pretrained(folder)
    assert len(enc.model.moe_layers) == 9
    product = [Product("red canvas sneaker", ["apparel", "shoes"], {"colour": "red"}, [])]
    same = MoonEncoder(model, "deep", "x").encode_products(product)
    assert np.allclose(enc.encode_products(product), same, atol=1e-5)
    conf = json.loads((folder / "config.json").read_text())
    conf["moon"]["num_layers"] = 6  # the same tensors told to rebuild the shallower cut
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="layers.(6|7|8)"):
        load_pretrained(folder)


def test_served_loss_presets_change_only_what_the_loss_scores():
    import dataclasses

    from moonsearch.trainer.config import load_config

    for name, parent, extra in [("moon-mini-served", "moon-mini-cpu", {"model_options"}),
                                ("clip-finetune-served", "clip-finetune", set())]:
        cfg, base = load_config(name), load_config(parent)
        changed = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
        assert changed == {"run_name", "served_loss"} | extra, (name, changed)
        assert cfg.served_loss and not base.served_loss
    assert load_config("moon-mini-served").model_options == {"pool": "blocks"}  # as moon-mini is served


def test_field_dropout_withholds_category_and_attributes(world):
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.data import Batches

    b = Batches(world, load_config("moon-tiny-test", data=str(world)))
    item = next(iter(b.records))
    full, bare = b.product(item), b.product(item, bare=True)
    assert full.category and full.attributes and not bare.category and not bare.attributes
    assert bare.title == full.title and len(bare.images) == len(full.images)
    assert b.product(item).images[0] is full.images[0]  # each photo is decoded once


def test_hard_negatives_from_index_neighbours(world, tiny_index):
    import numpy as np

    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.data import Batches, Pair

    b = Batches(world, load_config("moon-tiny-test", data=str(world), hard_negative_index=str(tiny_index),
                                   hard_negative_k=3))
    assert b.neighbours
    rng = np.random.default_rng(0)
    for item, near in list(b.neighbours.items())[:20]:
        r = b.records[item]
        assert len(near) <= 3 and all(b.records[i].category[:1] == r.category[:1] for i in near)
        neg = b.hard_negative(Pair(item, r.group_id, "x", None, "text", 0), rng)
        if neg is None:  # a leaf holding only this product's group: nothing to draw
            assert all(b.records[i].group_id == r.group_id for i in b.by_leaf[tuple(r.category)])
            continue
        assert neg != item and (r.group_id is None or b.records[neg].group_id != r.group_id)
        allowed = [i for i in near if r.group_id is None or b.records[i].group_id != r.group_id]
        if allowed:
            assert neg in allowed


def test_config_values_are_typed_and_named_when_wrong():
    from moonsearch.trainer.config import load_config

    cfg = load_config("moon-mini-cpu", lr="1e-3", steps="40")  # what YAML and --set hand over
    assert cfg.lr == 1e-3 and cfg.steps == 40 and isinstance(cfg.steps, int)
    for bad, key in [(dict(lr="fast"), "lr"), (dict(steps="4.5"), "steps"), (dict(symmetric="yes"), "symmetric"),
                     (dict(no_such_key=1), "no_such_key")]:
        with pytest.raises(ValueError, match=key):
            load_config("moon-mini-cpu", **bad)


def _fsdp_worker(rank, world, init, cfg, out, cache):
    import torch.distributed as dist

    from datetime import timedelta

    from moonsearch.trainer.loop import Trainer

    # a timeout: ranks issuing different collectives fail the test instead of hanging it
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    # an empty cache whose tiny backbone folder rank 1 builds, under a process group, where transformers'
    # save_pretrained writes weights on rank 0 only: both ranks must then load a whole folder
    os.environ["MOONSEARCH_CACHE"] = cache
    if rank == 1:
        from moonsearch.models.moon import builtin_config

        builtin_config("moon-tiny")
    dist.barrier()
    tr = Trainer(cfg)
    for _ in range(2):
        tr.train_step()
    full = tr.state_tensors()  # collective under fsdp
    tr.save_state()
    again = Trainer(cfg)
    assert again.load_state() and again.step == 2
    reloaded = again.state_tensors()
    if rank == 0:
        torch.save({"full": {k: v for k, v in full.items() if k.startswith("model.")},
                    "reloaded": {k: v for k, v in reloaded.items() if k.startswith("model.")},
                    "sharded": type(next(tr.model.parameters())).__name__}, os.path.join(out, f"{cfg.strategy}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # ~20 s (two gloo processes): make test-slow, which CI runs after make test
def test_fsdp_matches_ddp_and_resumes(train_cfg, tmp_path):
    """2 gloo processes: FSDP (sharded parameters, gradients, optimiser state) takes the same steps as DDP,
    and its gathered checkpoint reloads into a fresh sharded trainer. Each run starts from an empty cache,
    so the test no longer depends on an earlier test having built the backbone's folder."""
    import torch.multiprocessing as mp

    for strategy in ("ddp", "fsdp"):
        cfg = replace(train_cfg, out=str(tmp_path / strategy), strategy=strategy, hard_negatives=False, queue_size=0)
        mp.spawn(_fsdp_worker, args=(2, f"file://{tmp_path}/init-{strategy}", cfg, str(tmp_path),
                                     str(tmp_path / f"cache-{strategy}")), nprocs=2, join=True)
    ddp, fsdp = (torch.load(tmp_path / f"{s}.pt", weights_only=True) for s in ("ddp", "fsdp"))
    assert fsdp["sharded"] == "DTensor" and ddp["sharded"] == "Parameter"
    assert ddp["full"].keys() == fsdp["full"].keys()
    for k in ddp["full"]:
        assert torch.allclose(ddp["full"][k], fsdp["full"][k], atol=2e-5), k
        assert torch.equal(fsdp["full"][k], fsdp["reloaded"][k]), k


def test_missing_training_data_names_the_file_and_the_fix(tmp_path):
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.data import load_pairs

    with pytest.raises(FileNotFoundError, match="catalog.parquet.*demo-data"):
        load_pairs(tmp_path, load_config("moon-tiny-test"))


def test_training_bench_reuses_runs_and_rows_only_for_the_same_config_and_data(world, tmp_path):
    """benchmarks/training.py keys finished runs on the effective config + data, not on the name."""
    import importlib.util
    import shutil

    from moonsearch.trainer.config import load_config

    spec = importlib.util.spec_from_file_location("bench_training", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "training.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = bench.data_hash(world)
    cfg = load_config("moon-mini-cpu", data=str(world))
    key = bench.config_key(cfg, data)
    assert bench.config_key(replace(cfg, out="elsewhere"), data) == key  # where runs go is not the recipe
    assert bench.config_key(replace(cfg, steps=cfg.steps + 1), data) != key
    assert bench.config_key(load_config("moon-mini-no-moe", data=str(world)), data) != key
    other = tmp_path / "w"
    other.mkdir()
    shutil.copy(world / "catalog.parquet", other / "catalog.parquet")
    (other / "behavior.parquet").write_bytes((world / "behavior.parquet").read_bytes() + b"\0")
    assert bench.data_hash(other) != data and bench.config_key(cfg, bench.data_hash(other)) != key
    assert bench.config_key(replace(cfg, seed=cfg.seed + 1), data) != key  # each seed trains its own run


def test_training_bench_summarises_seeds_as_mean_and_sample_spread(tmp_path):
    """--seed 0 --seed 1 ...: each preset's zero-shot rows become mean and sd per task, and a plot."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_training", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "training.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(r10, colour):
        return {"retrieval": {"text -> product": {"R@10": r10, "R@1": 0.1}}, "classification": {"level 1": 0.5},
                "attributes": {"colour": colour}}

    summary = bench.seed_summary({"a": [row(0.6, 0.2), row(0.8, 0.4), row(0.7, 0.3)], "b": [row(0.5, 0.5)] * 2})
    t = summary["a"]["tasks"]
    assert summary["a"]["seeds"] == 3 and t["text -> product R@10"]["mean"] == pytest.approx(0.7)
    assert t["text -> product R@10"]["sd"] == pytest.approx(0.1) and t["attribute colour"]["max"] == 0.4
    assert t["text -> product R@1"]["mean"] == pytest.approx(0.1)  # R@1 beside R@10: R@10 saturates
    assert summary["b"]["tasks"]["classification level 1"]["sd"] == 0.0
    bench.write_seed_report(summary, tmp_path, "s")
    assert "0.700 ± 0.100" in (tmp_path / "s.md").read_text() and (tmp_path / "s.png").stat().st_size > 5000


def test_memory_estimate_counts_real_parameters_and_the_3b_preset_fits_80gb(tmp_path):
    from transformers import AutoModel
    from typer.testing import CliRunner

    from moonsearch.cli import app
    from moonsearch.models.moon.backbones import save_tiny_qwen_vl
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.memory import backbone_params, estimate, shape_of

    for family in ("qwen2_vl", "qwen2_5_vl"):  # the formula against real models of both families
        folder = save_tiny_qwen_vl(tmp_path / family, family=family)
        real = sum(p.numel() for p in AutoModel.from_pretrained(folder).parameters())
        assert abs(backbone_params(shape_of(str(folder))) - real) / real < 0.03, (family, real)
    cfg = load_config("moon-qwen2.5-vl-3b")
    fits = estimate(cfg, world=8)
    assert 3.5e9 < fits.params_backbone < 4.0e9 and fits.total_gb < 80
    full = estimate(replace(cfg, model_options={"image_size": 448}), world=8)  # full FFN copies as experts
    assert full.params_experts > 9e9 and full.total_gb > 80
    res = CliRunner().invoke(app, ["train", "--preset", "moon-qwen2.5-vl-3b", "--dry-run", "--world", "8"])
    assert res.exit_code == 0 and "memory per rank" in res.output and "3.75B" in res.output
    assert "micro-batch 16 queries" in " ".join(res.output.split())  # 256 over 8 ranks and 2 micro-batches
    # --set reaches keys that have their own option too (it crashed on them), and a clash is named
    res = CliRunner().invoke(app, ["train", "--preset", "moon-qwen2.5-vl-3b", "--dry-run", "--world", "8",
                                   "--set", "batch_size=32"])
    assert res.exit_code == 0 and "micro-batch 2 queries" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["train", "--preset", "moon-qwen2.5-vl-3b", "--dry-run", "--set", "batch_size=32",
                                   "--batch-size", "16"])
    assert res.exit_code != 0 and "--set batch_size=32 and --batch-size 16 disagree" in " ".join(res.output.split())


def test_gradient_checkpointing_takes_the_same_step(train_cfg, tmp_path):
    """Recomputing activations in backward (with the experts' token maps restored) gives the same
    update as keeping them."""
    from moonsearch.trainer.loop import Trainer

    steps = {}
    for ckpt in (False, True):
        tr = Trainer(replace(train_cfg, out=str(tmp_path / f"runs{ckpt}"), gradient_checkpointing=ckpt, batch_size=8))
        assert tr.tm.module.adapter.model.language_model.gradient_checkpointing == ckpt
        before = {n: p.detach().clone() for n, p in tr.tm.module.named_parameters() if p.requires_grad}
        assert math.isfinite(tr.train_step()["loss"])
        steps[ckpt] = {n: p.detach() - before[n] for n, p in tr.tm.module.named_parameters() if p.requires_grad}
    assert any("expert" in n and d.abs().sum() > 0 for n, d in steps[True].items())
    for n in steps[False]:
        assert torch.allclose(steps[False][n], steps[True][n], atol=1e-6), n


def test_training_bench_judges_a_trained_moon_as_the_reference_is_served(tmp_path):
    """--serve-like: the ablation's trained weights, byte for byte, with the reference's pooling and fixed
    blocks; a text query then leaves the image block empty, as moon-mini served by blocks does."""
    import importlib.util
    import json

    import numpy as np
    from safetensors.torch import load_file

    from moonsearch.models.base import Query
    from moonsearch.models.moon import SERVED_FIELDS, builtin_config
    from moonsearch.models.moon.encoder import build_model, load_pretrained, save_pretrained

    spec = importlib.util.spec_from_file_location("bench_training", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "training.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    trained = build_model(replace(builtin_config("moon-tiny"), pool="split", seed=3))
    final = save_pretrained(trained, tmp_path / "run" / "final", meta={"steps": 7})
    reference = save_pretrained(build_model(replace(builtin_config("moon-tiny"), pool="blocks", text_pool_weight=0.8)),
                                tmp_path / "reference")
    out = bench.served_like(final, reference)
    assert out.parent == final.parent and bench.served_like(final, reference) == out  # made once
    assert (out / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    conf, before = json.loads((out / "config.json").read_text()), json.loads((final / "config.json").read_text())
    assert conf["moon"]["pool"] == "blocks" and conf["moon"]["text_pool_weight"] == 0.8
    assert {k: v for k, v in conf["moon"].items() if k not in SERVED_FIELDS} == \
        {k: v for k, v in before["moon"].items() if k not in SERVED_FIELDS}  # the recipe itself unchanged
    assert conf["meta"]["steps"] == 7
    enc = load_pretrained(out)
    state = load_file(str(final / "model.safetensors"))
    own = enc.model.state_dict()
    assert all(torch.equal(own[k].float(), v.float()) for k, v in state.items())
    v = enc.encode_queries([Query("red shoe")])[0]
    half = enc.semantic_dim // 2
    assert np.abs(v[half:enc.semantic_dim]).max() == 0 and np.linalg.norm(v[:half]) > 0.5
    base = bench.served_base(reference)  # the untrained row is judged the same way
    assert (base.cfg.pool, base.cfg.text_pool_weight, base.cfg.num_layers) == ("blocks", 0.8, 6)
    with pytest.raises(ValueError, match="not a MOON"):
        (tmp_path / "clip").mkdir()
        (tmp_path / "clip" / "config.json").write_text(json.dumps({"format": "moonsearch-clip-mini/1"}))
        bench.served_like(tmp_path / "clip", reference)


def test_publishing_moon_mini_keeps_how_it_is_served(tmp_path, monkeypatch):
    """A moon-mini run trains with split pooling; published, its weights are served as moon-mini was
    (block pooling and the fixed blocks, chosen on real artwork), so a product's photos still never make
    it harder to find by its own name. The weights are the run's."""
    import json
    import shutil

    import moonsearch.models.moon as moon
    from safetensors.torch import load_file

    from moonsearch.models.moon.encoder import load_pretrained
    from moonsearch.trainer.loop import publish_moon_mini

    shipped = tmp_path / "assets" / "moon-mini"
    shutil.copytree(moon.MINI_CHECKPOINT, shipped)
    monkeypatch.setattr(moon, "MINI_CHECKPOINT", shipped)
    final = tmp_path / "runs" / "moon-mini-cpu" / "final"  # what a fresh run writes: its training settings
    shutil.copytree(shipped, final)
    conf = json.loads((final / "config.json").read_text())
    conf["moon"].update(pool="split", image_to_text_weight=0.6)
    conf["meta"] = {"steps": 3}
    (final / "config.json").write_text(json.dumps(conf))
    assert publish_moon_mini(final) == shipped
    got = json.loads((shipped / "config.json").read_text())
    assert got["moon"]["pool"] == "blocks" and "image_to_text_weight" not in got["moon"]
    assert got["meta"]["steps"] == 3 and "kept from the previous moon-mini" in got["meta"]["serving"]
    assert load_pretrained(shipped).cfg.pool == "blocks"
    assert load_file(str(shipped / "model.safetensors")).keys() == load_file(str(final / "model.safetensors")).keys()
    publish_moon_mini(final, keep_serving=False)  # as trained, when asked
    assert json.loads((shipped / "config.json").read_text())["moon"]["pool"] == "split"


def test_similarity_kl_is_zero_when_the_geometry_agrees_and_pulls_toward_the_teacher():
    from moonsearch.training.losses import similarity_kl

    g = torch.Generator().manual_seed(0)
    teacher = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    rot, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    same = F.pad(teacher @ rot, (0, 4))  # another space (10-d), the same similarities
    assert similarity_kl(same, teacher).item() == pytest.approx(0.0, abs=1e-5)
    raw = torch.randn(8, 10, generator=g, requires_grad=True)
    opt = torch.optim.SGD([raw], lr=0.2)
    first = similarity_kl(F.normalize(raw, dim=-1), teacher).item()
    assert first > 0.1
    for _ in range(200):
        opt.zero_grad()
        similarity_kl(F.normalize(raw, dim=-1), teacher).backward()
        opt.step()
    s = F.normalize(raw.detach(), dim=-1)
    assert similarity_kl(s, teacher).item() < first / 3
    off = ~torch.eye(8, dtype=torch.bool)  # the student's similarities now order pairs as the teacher's do
    assert torch.corrcoef(torch.stack([(s @ s.T)[off], (teacher @ teacher.T)[off]]))[0, 1] > 0.8


def test_distillation_pulls_moon_text_similarities_toward_minilm_and_only_moon_takes_it(world, tmp_path):
    """distill_weight: the steps log the term, and MOON's text-only vectors of texts it never trained on
    move toward MiniLM's similarities; the CLIP baselines refuse it by name (their text side is MiniLM)."""
    from moonsearch.errors import UserError
    from moonsearch.models.base import Query
    from moonsearch.models.towers import MiniLMTextTower
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import Trainer
    from moonsearch.training.losses import similarity_kl

    texts = ["red leather boots", "crimson ankle boots", "blue denim jacket", "navy jean coat",
             "steel kitchen knife", "chef's cooking knife", "wooden garden chair", "oak patio seat"]
    teacher = MiniLMTextTower().embed(texts)

    def gap(tr):
        return similarity_kl(torch.from_numpy(tr.enc.encode_queries([Query(t, None) for t in texts])), teacher).item()

    after = {}
    for w in (0.0, 1.0):  # the same run (seed, batches) without and with the term
        tr = Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path / str(w)), steps=12, val_every=0,
                                 ckpt_every=100, distill_weight=w, lr=3e-3))
        before = gap(tr)
        rows = [tr.train_step() for _ in range(12)]
        assert all(math.isfinite(r["loss"]) for r in rows)
        assert all(r["distill"] > 0 for r in rows) if w else all("distill" not in r for r in rows)
        after[w] = gap(tr)
    assert after[1.0] < 0.85 * after[0.0] < before  # contrastive steps alone close some of it (tiny model)
    # outside texts (distill_texts): drawn into every step's batch, they are pulled toward MiniLM too
    outside = tmp_path / "texts.txt"
    outside.write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    tr = Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path / "outside"), steps=12, val_every=0,
                             ckpt_every=100, distill_weight=1.0, lr=3e-3, distill_texts=str(outside), distill_extra=8))
    assert tr.distill_pool == texts
    for _ in range(12):
        tr.train_step()
    assert gap(tr) < 0.7 * after[1.0]
    with pytest.raises(UserError, match="distill_weight"):
        Trainer(load_config("clip-finetune", data=str(world), out=str(tmp_path), distill_weight=1.0))
    with pytest.raises(UserError, match="distill_weight is 0"):
        Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path), distill_texts=str(outside)))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="blank.txt holds no text"):
        Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path), distill_weight=1.0,
                            distill_texts=str(tmp_path / "blank.txt")))
    with pytest.raises(UserError, match="missing.txt not found"):
        Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path), distill_weight=1.0,
                            distill_texts=str(tmp_path / "missing.txt")))


def test_image_distillation_pulls_moon_picture_similarities_toward_the_visual_tower(world, tmp_path):
    """distill_image_weight: the term compares MOON's own image side (each picture alone, the visual block
    left out) with the visual block tower's vectors of the same pictures, its gradient closes that gap,
    the training steps log it; the CLIP baselines and a MOON without a visual block refuse it by name."""
    from moonsearch.data.images import content_key
    from moonsearch.errors import UserError
    from moonsearch.models.base import Query
    from moonsearch.models.cropping import crop
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import Trainer
    from moonsearch.training.losses import similarity_kl

    visual = {"visual_product": 0.7071}
    tr = Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path / "w"), steps=4, val_every=0,
                             ckpt_every=100, distill_image_weight=1.0, model_options=visual))
    pairs = tr.batch_at(0)
    products = [tr.batches.product(p.item_id) for p in pairs]
    queries = [tr.batches.query(p) for p in pairs]
    enc, pics = tr.enc, [p.images[0] for p in products] + [q.image for q in queries if q.image is not None]
    pics = list({content_key(im): im for im in pics}.values())  # each distinct picture once, as the term has them
    crops = [crop(im, b) for im, b in zip(pics, enc._boxes(pics, [""] * len(pics)))]
    teacher = torch.from_numpy(enc.visual.pictures(enc.image_tower, pics, crops))
    tr.model.train()
    own = F.normalize(tr.model(enc.query_batch([Query(None, im) for im in pics]))[0].float(), dim=-1)
    term = tr.tm.distill_images(products, queries, 0.05)
    assert torch.allclose(term, similarity_kl(own, teacher, 0.05), atol=1e-4)
    opt = torch.optim.Adam([p for p in tr.model.parameters() if p.requires_grad], lr=3e-3)
    first = term.item()
    for _ in range(15):  # the term's own gradient moves MOON's picture geometry toward the tower's
        loss = tr.tm.distill_images(products, queries, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert tr.tm.distill_images(products, queries, 0.05).item() < 0.6 * first
    for w in (0.0, 1.0):  # training steps log it only when it is on
        t = Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path / str(w)), steps=2, val_every=0,
                                ckpt_every=100, distill_image_weight=w, model_options=visual))
        rows = [t.train_step() for _ in range(2)]
        assert all(math.isfinite(r["loss"]) for r in rows)
        assert all(r["distill_image"] > 0 for r in rows) if w else all("distill_image" not in r for r in rows)
    with pytest.raises(UserError, match="distill_image_weight"):
        Trainer(load_config("clip-finetune", data=str(world), out=str(tmp_path), distill_image_weight=1.0))
    with pytest.raises(UserError, match="no visual block"):
        Trainer(load_config("moon-tiny-test", data=str(world), out=str(tmp_path), distill_image_weight=1.0))
