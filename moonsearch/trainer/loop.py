"""The MOON trainer: behaviour pairs -> InfoNCE with in-batch, same-category, cross-rank and queued
negatives -> a MOON checkpoint that ``moonsearch index --model moon:<run>/final`` uses.

    moonsearch train --preset moon-mini-cpu                       # one process, CPU
    torchrun --nproc-per-node 2 -m moonsearch.trainer.loop --preset moon-tiny-test   # DDP (gloo on CPU)

Run folder: ``config.yaml`` (resolved), ``metrics.jsonl``, ``loss.png``, ``last/`` (resumable state:
model + optimizer + step as safetensors and JSON) and ``final/`` (the checkpoint). Re-running the
same command resumes from ``last/`` with the same data order.

The pieces: ``trainer/data.py`` (pairs, products, hard negatives), ``trainer/objective.py`` (negatives,
false-negative masks and the loss of one micro-batch), ``trainer/models.py`` (what trains),
``trainer/memory.py`` (the dry-run estimate); this module is the loop, its state and the entry point.
The ``moonsearch/training/`` package holds the model-agnostic building blocks they use (InfoNCE,
the negative queue, the unique-item sampler, cross-rank collectives).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from moonsearch.trainer.config import TrainConfig
from moonsearch.trainer.data import Batches, Pair, distill_texts, load_pairs
from moonsearch.trainer.objective import contrastive_loss
from moonsearch.training.distributed import all_reduce_gradients, is_distributed, rank_and_world
from moonsearch.training.queue import NegativeQueue
from moonsearch.training.sampler import UniqueBatchSampler
from moonsearch.utils.io import append_jsonl, atomic_path, atomic_write_json, atomic_write_text, swap_in_dir
from moonsearch.errors import UserError

def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        from moonsearch.trainer.models import trainable

        self.cfg, self.log = cfg, log
        self.rank, self.world = rank_and_world()
        torch.manual_seed(cfg.seed)
        self.device = f"cuda:{self.rank % max(1, torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
        self.tm = trainable(cfg, self.device)
        self.enc, self.model = self.tm.encoder, self.tm.module
        self.fsdp = cfg.strategy == "fsdp" and is_distributed()
        if cfg.strategy not in ("ddp", "fsdp"):
            raise UserError(f"strategy {cfg.strategy!r}: expected ddp or fsdp")
        if self.fsdp:  # parameters, gradients and optimiser state sharded over ranks, layer by layer
            from torch.distributed.fsdp import fully_shard

            if not hasattr(self.model, "moe_layers"):
                raise UserError("strategy fsdp shards MOON models; the CLIP baselines train with ddp")
            for layer in getattr(getattr(self.model, "adapter", None), "decoder_layers", lambda: [])():
                fully_shard(layer)
            fully_shard(self.model)
        if cfg.distill_weight and not self.tm.distills:
            raise UserError(f"distill_weight: distillation toward MiniLM trains MOON's text side; {cfg.model} has "
                            "none to distil (clip-mini's text side is MiniLM already)")
        if cfg.distill_image_weight and not self.tm.distills:
            raise UserError(f"distill_image_weight: distillation toward the visual block's tower trains MOON's image "
                            f"side; {cfg.model} has none to distil (clip-mini's image side is that tower already)")
        if cfg.distill_image_weight and self.enc.visual is None:
            raise UserError(f"distill_image_weight: the teacher is the visual block's tower, and {cfg.model} has no "
                            "visual block (visual_product is 0)")
        if cfg.distill_texts and not cfg.distill_weight:
            raise UserError("distill_texts is set but distill_weight is 0: the texts would not be used")
        self.distill_pool = distill_texts(cfg.distill_texts) if cfg.distill_texts else []
        self.params = self.tm.parameters()
        self.log_t = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)),
                                        requires_grad=cfg.learnable_temperature)
        # parts trained from scratch (projector, projection head, gates) may learn faster than the
        # pretrained weights' deltas (experts, LoRA): cfg.new_lr_scale
        new = {id(p) for p in self.tm.new_parameters()}
        groups = [{"params": [p for p in self.params if id(p) not in new], "lr_scale": 1.0},
                  {"params": [p for p in self.params if id(p) in new], "lr_scale": cfg.new_lr_scale},
                  {"params": [self.log_t] if cfg.learnable_temperature else [], "lr_scale": 1.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.queue = NegativeQueue(cfg.queue_size, self.tm.dim).to(self.device) if cfg.queue_size else None
        self.data = Path(cfg.data)
        self.train_pairs, self.val_pairs = load_pairs(self.data, cfg)
        self.batches = Batches(self.data, cfg)
        self.sampler = UniqueBatchSampler([p.item_id for p in self.train_pairs],
                                          [p.group_id for p in self.train_pairs],
                                          cfg.batch_size, cfg.seed, rank=self.rank, world_size=self.world)
        self.run = Path(cfg.out) / cfg.run_name
        self.step = 0
        self._epoch_lens: dict[int, int] = {}

    # ---- state -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            return self._fsdp_state_tensors()
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.queue is not None:
            out.update({f"queue.{k}": v for k, v in self.queue.state_dict().items()})
        out["log_t"] = self.log_t.detach()
        for i, p in enumerate(self._opt_params()):
            st = self.opt.state.get(p, {})
            for k, v in st.items():
                out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def _opt_params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]

    def _fsdp_state_tensors(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) model and optimiser state, gathered to CPU: every rank must call this."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        out = {f"model.{k}": v for k, v in get_model_state_dict(self.model, options=full).items()}
        # (with cpu_offload only rank 0 receives the gathered tensors; the other ranks get empty dicts)
        for name, st in get_optimizer_state_dict(self.model, self.opt, options=full).get("state", {}).items():
            for k, v in st.items():
                out[f"optn.{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        if self.queue is not None:
            out.update({f"queue.{k}": v for k, v in self.queue.state_dict().items()})
        out["log_t"] = self.log_t.detach()
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def _fsdp_load(self, st: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, {k[6:]: v for k, v in st.items() if k.startswith("model.")}, options=full)
        osd = get_optimizer_state_dict(self.model, self.opt, options=full)  # for its param_groups
        state: dict[str, dict] = {}
        for k, v in st.items():
            if k.startswith("optn."):
                name, key = k[5:].rsplit(".", 1)
                state.setdefault(name, {})[key] = v
        set_optimizer_state_dict(self.model, self.opt, {"state": state, "param_groups": osd["param_groups"]},
                                 options=full)

    def save_state(self) -> None:
        """Rank 0 writes ``last/`` (atomically swapped in); every rank returns once it is there."""
        tensors = self._fsdp_state_tensors() if self.fsdp else None  # collective: all ranks
        if self.rank == 0:
            self._write_state(tensors if tensors is not None else self.state_tensors())
        if is_distributed():
            import torch.distributed as dist

            dist.barrier()

    def _write_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.run / ".last.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json({"step": self.step, "config": self.cfg.to_dict()}, tmp / "trainer.json")
        swap_in_dir(tmp, self.run / "last")

    def load_state(self) -> bool:
        from safetensors.torch import load_file

        last = self.run / "last"
        if not (last / "trainer.json").exists():
            return False
        st = load_file(str(last / "state.safetensors"))
        if self.fsdp:
            self._fsdp_load(st)
        else:
            self.model.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith("model.")})
        if self.queue is not None:
            self.queue.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith("queue.")})
        with torch.no_grad():
            self.log_t.copy_(st["log_t"])
        for i, p in enumerate([] if self.fsdp else self._opt_params()):
            keys = {k.split(".", 2)[2]: v for k, v in st.items() if k.startswith(f"opt.{i}.")}
            if keys:
                self.opt.state[p] = {k: v.to(self.device) if k != "step" else v for k, v in keys.items()}
        self.step = json.loads((last / "trainer.json").read_text())["step"]
        return True

    # ---- one step ----------------------------------------------------------------------------
    def batch_at(self, step: int) -> list[Pair]:
        """The (rank's share of the) global batch number ``step``: epochs follow each other, each with its
        own seeded order (epochs can hold different numbers of batches)."""
        epoch = 0
        while step >= self._epoch_len(epoch):
            step -= self._epoch_len(epoch)
            epoch += 1
        idx = next(self.sampler(epoch, start=step))
        return [self.train_pairs[i] for i in idx]

    def _epoch_len(self, epoch: int) -> int:
        if epoch not in self._epoch_lens:
            self._epoch_lens[epoch] = len(self.sampler.batches(epoch))
            if not self._epoch_lens[epoch]:
                raise UserError(f"{self.data}: the training split has fewer than {self.cfg.batch_size} distinct "
                                 "items (or groups) for one batch; lower batch_size")
        return self._epoch_lens[epoch]

    def train_step(self) -> dict:
        cfg = self.cfg
        self.model.train()
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg) * g["lr_scale"]
        totals = {"loss": 0.0, "aux": 0.0, "candidates": 0, "data_s": 0.0, "forward_s": 0.0, "backward_s": 0.0,
                  **({"distill": 0.0} if cfg.distill_weight else {}),
                  **({"distill_image": 0.0} if cfg.distill_image_weight else {})}
        for micro in range(cfg.grad_accum):
            td = time.perf_counter()
            pairs = self.batch_at(self.step * cfg.grad_accum + micro)
            rng = np.random.default_rng([cfg.seed, 7, self.step, micro, self.rank])
            items = [p.item_id for p in pairs]
            groups = [p.group_id for p in pairs]
            # one hard negative per pair on every rank (a random other-group product where the category
            # has none), so all ranks gather equally many products and rank r's positives sit at r * len
            hard = [self.batches.hard_negative(p, rng, fallback=True) for p in pairs] if cfg.hard_negatives else []
            bare = rng.random(len(items) + len(hard)) < cfg.field_dropout
            products = [self.batches.product(i, b) for i, b in zip(items + hard, bare)]
            queries = [self.batches.query(p) for p in pairs]
            self.tm.warm(products, queries)  # core-product boxes (cached after the first sight of an image)
            tf = time.perf_counter()  # forward time counts from here: data loading and crops are before
            totals["data_s"] += tf - td
            ctx = torch.autocast("cuda", torch.bfloat16) if (cfg.mixed_precision and self.device != "cpu") \
                else torch.autocast("cpu", enabled=False)
            with ctx:
                p_emb, aux = self.tm.products(products)
                q_emb, aux_q = self.tm.queries(queries)
            if self.tm.served:  # already the served vectors (a product without photos keeps its norm < 1)
                p_emb, q_emb = p_emb.float(), q_emb.float()
            else:
                p_emb, q_emb = F.normalize(p_emb.float(), dim=-1), F.normalize(q_emb.float(), dim=-1)
            scored = contrastive_loss(q_emb, p_emb, (items, groups),
                                      (items + hard, groups + [self.batches.records[h].group_id for h in hard]),
                                      cfg, self.queue, self.rank, self.world, 1 / self.log_t.exp())
            loss = scored.loss
            total = loss + cfg.aux_weight * (aux + aux_q)
            if cfg.distill_weight:
                pool = self.distill_pool  # drawn after the batch's own draws: same batches with or without
                extra = [pool[i] for i in rng.choice(len(pool), min(cfg.distill_extra, len(pool)), replace=False)] \
                    if pool else []
                with ctx:
                    distill = self.tm.distill(products, queries, cfg.distill_temperature, extra)
                total = total + cfg.distill_weight * distill
                totals["distill"] += float(distill.detach()) / cfg.grad_accum
            if cfg.distill_image_weight:
                with ctx:
                    distill = self.tm.distill_images(products, queries, cfg.distill_temperature)
                total = total + cfg.distill_image_weight * distill
                totals["distill_image"] += float(distill.detach()) / cfg.grad_accum
            tb = time.perf_counter()
            (total / cfg.grad_accum).backward()
            totals["backward_s"] += time.perf_counter() - tb
            totals["forward_s"] += tb - tf
            totals["loss"] += loss.item() / cfg.grad_accum
            totals["candidates"] = scored.candidates  # products each query is scored against (positive included)
            totals["aux"] += float((aux + aux_q).detach()) / cfg.grad_accum
            if self.queue is not None:
                self.queue.push(*scored.fresh)
        if is_distributed() and not self.fsdp:
            all_reduce_gradients(self.params)  # same collectives on every rank, missing gradients as zeros
        t1 = time.perf_counter()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "lr": lr_at(self.step - 1, cfg), "temperature": float(1 / self.log_t.exp()),
                "step_s": time.perf_counter() - t0, "opt_s": time.perf_counter() - t1,
                "samples_per_s": cfg.batch_size * cfg.grad_accum / (time.perf_counter() - t0), **totals}

    # ---- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Recall@10 of the validation queries within a fixed pool: their positives + random products."""
        self.model.eval()
        rng = np.random.default_rng([self.cfg.seed, 99])
        pos = sorted({p.item_id for p in self.val_pairs})
        others = [i for i in self.batches.records if i not in set(pos)]
        extra = max(0, self.cfg.val_pool - len(pos))
        pool = pos + list(rng.choice(others, size=min(extra, len(others)), replace=False))
        P = self.enc.encode_products([self.batches.product(i) for i in pool], batch_size=8)
        Q = self.enc.encode_queries([self.batches.query(p) for p in self.val_pairs], batch_size=16)
        self.model.train()
        col = {i: j for j, i in enumerate(pool)}
        S = Q @ P.T
        target = np.array([col[p.item_id] for p in self.val_pairs])
        ranks = (S > S[np.arange(len(S)), target][:, None]).sum(1)
        return {"val_recall@10": float((ranks < 10).mean()), "val_recall@1": float((ranks < 1).mean()),
                "val_queries": len(self.val_pairs), "val_pool": len(pool)}


def plot_metrics(run: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val_recall@10" in r]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr])
    ax[0].set_title("training loss (InfoNCE)")
    ax[0].set_xlabel("step")
    ax[1].plot([r["step"] for r in va], [r["val_recall@10"] for r in va], marker="o")
    ax[1].set_title("validation recall@10")
    ax[1].set_xlabel("step")
    ax[1].set_ylim(0, 1)
    fig.tight_layout()
    with atomic_path(run / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig, log=print, progress=None, stop_after: int | None = None) -> Path:
    """Run (or resume) training; returns the final checkpoint folder. ``stop_after`` ends the call
    after that many steps of this call (an interruption, for tests)."""
    tr = Trainer(cfg, log)
    run = tr.run
    if tr.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), run / "config.yaml")
    if tr.load_state():
        log(f"resumed {run} at step {tr.step}")
    elif tr.rank == 0 or tr.fsdp:  # a sharded model needs every rank in its forward passes
        first = {"step": 0, **tr.validate()}
        if tr.rank == 0:
            append_jsonl([first], run / "metrics.jsonl")
            log(f"step 0: validation recall@10 {first['val_recall@10']:.3f}")
    tick = progress(cfg.steps, tr.step) if progress else None
    done = 0
    while tr.step < cfg.steps:
        m = tr.train_step()
        done += 1
        if tr.rank == 0:
            append_jsonl([m], run / "metrics.jsonl")
            if tick:
                tick(m)
        if cfg.val_every and tr.step % cfg.val_every == 0 and tr.step < cfg.steps and (tr.rank == 0 or tr.fsdp):
            v = {"step": tr.step, **tr.validate()}
            if tr.rank == 0:
                append_jsonl([v], run / "metrics.jsonl")
                log(f"step {tr.step}: loss {m['loss']:.3f}, validation recall@10 {v['val_recall@10']:.3f}")
        if tr.step % cfg.ckpt_every == 0 or tr.step == cfg.steps:
            tr.save_state()
        if stop_after is not None and done >= stop_after:
            return run / "last"
    final = run / "final"
    if tr.fsdp:  # collectives: every rank validates and gathers the full weights
        v = {"step": tr.step, **tr.validate()}
        state = {k[6:]: t for k, t in tr.state_tensors().items() if k.startswith("model.")}
    if tr.rank == 0:
        if not tr.fsdp:
            v, state = {"step": tr.step, **tr.validate()}, None
        append_jsonl([v], run / "metrics.jsonl")
        log(f"final: validation recall@10 {v['val_recall@10']:.3f}")
        name = tr.tm.save(final, meta={"trained_by": "moonsearch.trainer.loop", "steps": tr.step,
                                       "config": cfg.to_dict(), "val": v}, state=state)
        log(f"checkpoint {final}: use it as --model {name}")
        plot_metrics(run)
    return final


def publish_moon_mini(final: Path, keep_serving: bool = True) -> Path:
    """Make a trained moon-mini checkpoint the package's ``moon-mini`` weights (trained tensors only).

    ``keep_serving``: the new weights are served as moon-mini was (SERVED_FIELDS: pooling, the fixed
    visual and text blocks), not with the settings the run trained with. Those were chosen on real
    artwork, and a run trains with split pooling: published as trained, a product's photos could again
    make it harder to find by its own name."""
    from moonsearch.models.moon import MINI_CHECKPOINT, SERVED_FIELDS, served_as

    conf = json.loads((Path(final) / "config.json").read_text())
    if conf.get("weights") != "trained" or conf["moon"].get("source") != "smollm2-135m":
        raise UserError(f"{final}: only a moon-mini run that stored its trained tensors alone can be published")
    from safetensors.torch import load_file, save_file

    if keep_serving and (MINI_CHECKPOINT / "config.json").exists():
        conf["moon"] = served_as(conf["moon"], MINI_CHECKPOINT)
        conf.setdefault("meta", {})["serving"] = ("kept from the previous moon-mini: "
                                                  f"{', '.join(sorted(k for k in SERVED_FIELDS if k in conf['moon']))}")
    tmp = MINI_CHECKPOINT.with_name(MINI_CHECKPOINT.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    # stored as float16 (4.3 MB instead of 8.6 MB; loading casts back: vectors agree to cosine 0.9999999)
    state = load_file(str(Path(final) / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": conf["format"]})
    swap_in_dir(tmp, MINI_CHECKPOINT)
    return MINI_CHECKPOINT


def main(argv=None) -> None:
    """Entry point for torchrun: ``python -m moonsearch.trainer.loop --preset NAME [key=value ...]``."""
    import argparse

    import torch.distributed as dist

    from moonsearch.trainer.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset")
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", help="key=value (YAML values)")
    a = ap.parse_args(argv)
    over = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.overrides)}
    cfg = load_config(a.preset, a.config, **over)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
