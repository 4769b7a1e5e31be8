"""Fit clip-mini's heads: ``moonsearch fit-clip-mini [--out FILE]`` (about 3 minutes on 2 CPU cores).

Recipe (frozen towers, so features are computed once and the heads train in seconds):
1. generate a training world with a seed the demo never uses (default 1234, 1,500 products);
2. EfficientNet-Lite0 features + ImageNet logits for every listing and query photo, MiniLM embeddings
   for every product text and query text (plus 3 extra generated text queries per product);
3. Adam on three losses:
   - InfoNCE(query -> product), the retrieval objective, on fused product embeddings;
   - InfoNCE(listing photo <-> its product text), aligning the towers;
   - bridge keeping: ||W_i f||^2 on crops of real photographs (scikit-image) and ||W_t - I||^2, so
     off the synthetic domain clip-mini stays the zero-shot ImageNet -> MiniLM bridge.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from moonsearch.data.images import load_image
from moonsearch.data.synthetic import generate_world, make_query_text, sample_specs
from moonsearch.models.base import Product, product_text
from moonsearch.models.clip.mini import HEADS_FILE, MiniConfig, MiniHeads, initial_heads, save_heads
from moonsearch.models.towers import ImageTower, MiniLMTextTower

MAX_IMAGES = 4


def real_photo_crops(n: int, size: int, seed: int = 0) -> list:
    """Random crops of scikit-image's real photographs (never synthetic)."""
    from PIL import Image

    from moonsearch.data.render import _photos

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = _photos()[int(rng.integers(len(_photos())))]
        h, w = p.shape[:2]
        c = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        out.append(Image.fromarray(p[y:y + c, x:x + c]).resize((size, size)))
    return out


def compute_features(world: Path, cfg: MiniConfig, seed: int, log=print) -> dict:
    cat = pq.read_table(world / "catalog.parquet").to_pylist()
    beh = pq.read_table(world / "behavior.parquet").to_pylist()
    img_tower, txt_tower = ImageTower(cfg.image_size), MiniLMTextTower()
    index = {r["item_id"]: i for i, r in enumerate(cat)}
    t0 = time.time()
    paths = [p for r in cat for p in r["images"][:MAX_IMAGES]]
    feats, logits = img_tower.features([load_image(p, world) for p in paths])
    log(f"listing photos: {len(paths)} in {time.time() - t0:.0f}s")
    P = len(cat)
    pf = torch.zeros(P, MAX_IMAGES, 1280)
    pl = torch.zeros(P, MAX_IMAGES, 1000)
    pm = torch.zeros(P, MAX_IMAGES)
    k = 0
    for i, r in enumerate(cat):
        n = len(r["images"][:MAX_IMAGES])
        pf[i, :n], pl[i, :n], pm[i, :n] = feats[k:k + n], logits[k:k + n], 1
        k += n
    texts = [product_text(Product(r["title"], r["category"], dict(r["attributes"]))) for r in cat]
    ptext = txt_tower.embed(texts)
    # queries: the behaviour log plus extra generated text queries
    specs = {s.item_id: s for s in sample_specs(P, seed)}
    rng = np.random.default_rng(seed + 7)
    q_item, q_text, q_img = [], [], []
    for b in beh:
        q_item.append(index[b["item_id"]]), q_text.append(b["query_text"]), q_img.append(b["query_image"])
    for r in cat:
        for _ in range(3):
            q_item.append(index[r["item_id"]]), q_text.append(make_query_text(specs[r["item_id"]], rng)), q_img.append(None)
    has_t = [i for i, t in enumerate(q_text) if t]
    has_i = [i for i, p in enumerate(q_img) if p]
    qt = torch.zeros(len(q_item), 384)
    qt[has_t] = txt_tower.embed([q_text[i] for i in has_t])
    qf, ql = img_tower.features([load_image(q_img[i], world) for i in has_i])
    qif = torch.zeros(len(q_item), 1280)
    qil = torch.zeros(len(q_item), 1000)
    qif[has_i], qil[has_i] = qf, ql
    real_f, real_l = img_tower.features(real_photo_crops(256, cfg.image_size, seed))
    log(f"features done in {time.time() - t0:.0f}s ({len(q_item)} queries)")
    tmask = torch.zeros(len(q_item), dtype=torch.bool)
    tmask[has_t] = True
    imask = torch.zeros(len(q_item), dtype=torch.bool)
    imask[has_i] = True
    feat = dict(pf=pf, pl=pl, pm=pm, ptext=ptext, q_item=torch.tensor(q_item), qt=qt, qif=qif, qil=qil,
                tmask=tmask, imask=imask, real_f=real_f, real_l=real_l)
    return {k: v.clone() for k, v in feat.items()}  # out of inference mode, so autograd may use them


def product_embeddings(heads: MiniHeads, pf, pl, pm, ptext) -> torch.Tensor:
    P, M = pm.shape
    img = heads.image(pf.reshape(P * M, -1), pl.reshape(P * M, -1)).reshape(P, M, -1)  # (P, M, d)
    img = F.normalize((img * pm.unsqueeze(-1)).sum(1), dim=-1)  # (P, d)
    return F.normalize(heads.cfg.image_weight * img + heads.cfg.text_weight * heads.text(ptext), dim=-1)


def query_embeddings(heads: MiniHeads, qt, qif, qil, tmask, imask) -> torch.Tensor:
    t = heads.text(qt) * tmask.unsqueeze(-1)
    i = heads.image(qif, qil) * imask.unsqueeze(-1)
    return F.normalize(heads.cfg.text_weight * t + heads.cfg.image_weight * i, dim=-1)  # (Q, d)


def fit(feat: dict, cfg: MiniConfig, heads: MiniHeads, epochs: int = 40, batch: int = 256, lr: float = 2e-3,
        temperature: float = 0.05, bridge_weight: float = 1.0, seed: int = 0, log=print) -> MiniHeads:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    eye = torch.eye(cfg.dim, 384)
    Q = len(feat["q_item"])
    for ep in range(epochs):
        perm = torch.randperm(Q)
        tot = 0.0
        for s in range(0, Q, batch):
            idx = perm[s:s + batch]
            items = feat["q_item"][idx]
            uniq, inv = torch.unique(items, return_inverse=True)  # same item twice = same target
            prod = product_embeddings(heads, feat["pf"][uniq], feat["pl"][uniq], feat["pm"][uniq], feat["ptext"][uniq])
            q = query_embeddings(heads, feat["qt"][idx], feat["qif"][idx], feat["qil"][idx],
                                 feat["tmask"][idx], feat["imask"][idx])
            l_qp = F.cross_entropy(q @ prod.T / temperature, inv)
            # photo <-> text alignment on the first photo of each product in the batch
            img = heads.image(feat["pf"][uniq, 0], feat["pl"][uniq, 0])
            txt = heads.text(feat["ptext"][uniq])
            lg = img @ txt.T / temperature
            tgt = torch.arange(len(uniq))
            l_it = (F.cross_entropy(lg, tgt) + F.cross_entropy(lg.T, tgt)) / 2
            l_br = heads.w_i(feat["real_f"]).pow(2).sum(-1).mean() + (heads.w_t.weight - eye).pow(2).sum()
            loss = l_qp + 0.5 * l_it + bridge_weight * l_br
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss) * len(idx)
        if ep % 10 == 0 or ep == epochs - 1:
            log(f"epoch {ep}: loss {tot / Q:.4f}")
    return heads.eval()


def main(out: Path = HEADS_FILE, work: Path | None = None, n: int = 1500, seed: int = 1234, epochs: int = 40,
         log=print) -> Path:
    from moonsearch.paths import cache_dir

    cfg = MiniConfig()
    work = work or cache_dir() / f"clip-mini-train-{seed}-{n}"
    if not (work / "behavior.parquet").exists():
        log(f"generating the training world ({n} products, seed {seed}) in {work}")
        generate_world(work, n=n, seed=seed)
    cache = work / "features-photos256.safetensors"  # named by what it holds beyond the world: 256 photo crops
    if cache.exists():
        from safetensors.torch import load_file

        feat = load_file(str(cache))
    else:
        from safetensors.torch import save_file

        feat = compute_features(work, cfg, seed, log)
        save_file({k: v.contiguous() for k, v in feat.items()}, str(cache))
    heads = initial_heads(cfg)
    heads = fit(feat, cfg, heads, epochs=epochs, seed=seed, log=log)
    save_heads(heads, Path(out), {"recipe": "moonsearch.trainer.clip_mini", "world_seed": seed, "products": n,
                                  "epochs": epochs})
    log(f"saved {out}")
    return Path(out)


if __name__ == "__main__":
    main()
