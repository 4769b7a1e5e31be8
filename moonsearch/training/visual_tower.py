"""Fine-tuning the visual block's image tower on real artwork, so that one vendor's drawing finds another
vendor's drawing (or listing photo) of the same object.

The visual block (``moonsearch.models.visual``) matches pictures by EfficientNet-Lite0's GeM-pooled
ImageNet features, whitened. Those features know photographs; between two artists' drawings of a
camera they see mostly style. Linear maps on the frozen features, fitted on 36 vendors, learned the
training vendors' styles and did not carry over to held-out vendors, so here the whole tower is trained:

- **Data** (``pack``): every vendor of the wide fitting pool (``real.WIDE_GLYPHS``, IconPark's colour
  icons, streamline-ultimate-color; never an eval vendor, a set that redraws one, or emoji artwork),
  one drawing per concept, concepts drawn by 2+ vendors. Rendered once here (cairosvg) into compact
  uint8 arrays, with the fit split's background photographs and the pretrained weights, so that a GPU
  machine with no package index can train from one small folder.
- **Views** (``Views``, on the training device): each drawing is inked (glyphs in a random colour),
  scaled, moved and turned on white, or pasted into a real photograph beside two distractor drawings and
  framed as the whole photo or as a loose crop around the product (what the detector serves).
- **Objective**: InfoNCE between two vendors' drawings of a concept (each concept once per batch, so
  no false negatives), optionally plus InfoNCE toward all-MiniLM-L6-v2's embedding of the concept's
  name (a text anchor that no vendor's style carries).
- **Model** (``TunedTower``): the Lite0 trunk, GeM, L2 normalisation, a linear head to 256 dimensions
  started as the PCA whitening of the pool's pretrained features (so step 0 is the current block
  re-fitted on the pool); batch-norm statistics stay the pretrained ones.

The fit split's vendors (streamline-freehand-color, tabler, ph) are not in the pool: the fit split
judges the result as a held-out check, and the eval split is read once, for the tower adopted.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moonsearch.models import efficientnet_lite as effnet
from moonsearch.models.visual_tower import TunedTower

SPRITE = 128  # drawings are packed at this size
FRAME = 160  # the visual block's input size
BACKGROUND = 256


# ---- the pack (CPU, where the artwork and the renderer are) ---------------------------------------
def pool_concepts(vendors: list[str] | None = None) -> dict[str, dict[str, str]]:
    """vendor -> {concept: icon name} over the wide fitting pool (or ``vendors`` of it)."""
    from moonsearch.data import real

    real.check_wide_pool()
    allowed = [*real.WIDE_GLYPHS, *real.WIDE_COLOUR, "streamline-ultimate-color"]
    out = {}
    for v in vendors or allowed:
        if v not in allowed:
            raise ValueError(f"{v!r} is not in the wide fitting pool ({', '.join(allowed)})")
        out[v] = real.product_concepts(v)
    return out


def pack(out: Path, vendors: list[str] | None = None, min_vendors: int = 2, max_concepts: int | None = None,
         log=print) -> Path:
    """Render the pool's shared concepts into ``out`` (pack.npz, pack.json, lite0.safetensors)."""
    from safetensors.torch import save_file

    from moonsearch.data import real
    from moonsearch.data.render import PHOTOS, photo
    from moonsearch.models.towers import MiniLMTextTower
    from moonsearch.utils.io import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    per_vendor = pool_concepts(vendors)
    count: dict[str, int] = {}
    for cs in per_vendor.values():
        for c in cs:
            count[c] = count.get(c, 0) + 1
    names = sorted(c for c, n in count.items() if n >= min_vendors)[:max_concepts]
    index = {c: i for i, c in enumerate(names)}
    glyphs, g_concept, g_vendor, colours, c_concept, c_vendor = [], [], [], [], [], []
    vendor_names = sorted(per_vendor)
    t0 = time.time()
    for v in vendor_names:
        colour = v in real.WIDE_COLOUR or v.endswith("-color")
        for c, icon in sorted(per_vendor[v].items()):
            if c not in index:
                continue
            img = real.draw(v, icon, SPRITE)
            if colour:
                colours.append(np.asarray(img, np.uint8))
                c_concept.append(index[c])
                c_vendor.append(vendor_names.index(v))
            else:
                glyphs.append(np.asarray(img.convert("L"), np.uint8))
                g_concept.append(index[c])
                g_vendor.append(vendor_names.index(v))
        log(f"{v}: {len(glyphs)} glyphs, {len(colours)} colour drawings so far ({time.time() - t0:.0f} s)")
    from PIL import Image

    bgs = []
    for p in PHOTOS:  # the fit split's photographs (the eval split's are disjoint)
        im = Image.fromarray(photo(p)).convert("RGB")
        s = min(im.size)
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width - s) // 2 + s, (im.height - s) // 2 + s))
        bgs.append(np.asarray(im.resize((BACKGROUND, BACKGROUND), Image.BILINEAR), np.uint8))
    text = MiniLMTextTower().embed([real.words(c) for c in names]).numpy().astype(np.float16)
    arrays = dict(glyphs=np.stack(glyphs) if glyphs else np.zeros((0, SPRITE, SPRITE), np.uint8),
                  glyph_concept=np.array(g_concept, np.int32), glyph_vendor=np.array(g_vendor, np.int16),
                  colours=np.stack(colours) if colours else np.zeros((0, SPRITE, SPRITE, 3), np.uint8),
                  colour_concept=np.array(c_concept, np.int32), colour_vendor=np.array(c_vendor, np.int16),
                  backgrounds=np.stack(bgs), text=text)
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(buf.getvalue(), out / "pack.npz")
    meta = {"concepts": names, "vendors": vendor_names, "photos": list(PHOTOS), "sprite": SPRITE,
            "min_vendors": min_vendors}
    atomic_write_bytes(json.dumps(meta).encode(), out / "pack.json")
    trunk = {k: (v.half() if v.is_floating_point() else v).contiguous()  # fp16 halves what a GPU call carries
             for k, v in effnet.load_pretrained().state_dict().items() if not k.startswith("_fc")}
    save_file(trunk, str(out / "lite0.safetensors"))
    log(f"packed {len(names)} concepts: {len(glyphs)} glyphs + {len(colours)} colour drawings, "
        f"{(out / 'pack.npz').stat().st_size / 2**20:.1f} MiB")
    return out


# ---- views on the device ---------------------------------------------------------------------------
def _place(rgba: torch.Tensor, scale: torch.Tensor, centre: torch.Tensor, rot: torch.Tensor, size: int):
    """Premultiplied rgb + alpha (n, 4, S, S) placed into a (n, 4, size, size) frame: the sprite spans
    ``scale`` of the frame's width, its centre at ``centre`` (n, 2) in [-1, 1], turned by ``rot``."""
    cos, sin = torch.cos(rot), torch.sin(rot)
    a = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / scale[:, None, None]
    t = -(a @ centre[..., None])[..., 0]
    grid = F.affine_grid(torch.cat([a, t[..., None]], -1), [len(rgba), 4, size, size], align_corners=False)
    return F.grid_sample(rgba, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Views:
    """Random views of packed drawings, made on ``device`` (normalised for Lite0, (n, 3, FRAME, FRAME))."""

    def __init__(self, arrays: dict[str, np.ndarray], device: str, frame: int = FRAME, listing: float = 0.45,
                 seed: int = 0):
        self.dev = torch.device(device)
        self.frame, self.listing = frame, listing
        self.glyphs = torch.from_numpy(arrays["glyphs"]).to(self.dev)
        self.colours = torch.from_numpy(arrays["colours"]).to(self.dev)
        self.bgs = torch.from_numpy(arrays["backgrounds"]).to(self.dev).permute(0, 3, 1, 2)
        self.n_glyphs = len(self.glyphs)
        self.g = torch.Generator(device=self.dev).manual_seed(seed)

    def u(self, n: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=self.g, device=self.dev)

    def sprites(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, 4, S, S) premultiplied rgb + alpha; glyphs get a random ink, dark grey or any colour."""
        n = len(ids)
        out = torch.empty(n, 4, self.glyphs.shape[-1], self.glyphs.shape[-1], device=self.dev)
        is_g = ids < self.n_glyphs
        if is_g.any():
            alpha = 1.0 - self.glyphs[ids[is_g]].float()[:, None] / 255.0
            m = int(is_g.sum())
            grey = self.u(m, 0.05, 0.3)[:, None].expand(m, 3)
            ink = torch.where((torch.rand(m, 1, generator=self.g, device=self.dev) < 0.5), grey,
                              0.85 * torch.rand(m, 3, generator=self.g, device=self.dev))
            out[is_g] = torch.cat([alpha * ink[:, :, None, None], alpha], 1)
        if (~is_g).any():
            rgb = self.colours[ids[~is_g] - self.n_glyphs].float().permute(0, 3, 1, 2) / 255.0
            alpha = ((1.0 - rgb.min(1, keepdim=True).values) / 0.06).clamp(0, 1)
            out[~is_g] = torch.cat([rgb * alpha, alpha], 1)
        return out

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        n, f, dev = len(ids), self.frame, self.dev
        main = self.sprites(ids)
        listing = torch.rand(n, generator=self.g, device=dev) < self.listing
        # white canvas, or a zoomed crop of a real photograph
        canvas = torch.ones(n, 3, f, f, device=dev)
        if listing.any():
            m = int(listing.sum())
            bg = self.bgs[torch.randint(len(self.bgs), (m,), generator=self.g, device=dev)].float() / 255.0
            z = self.u(m, 1.0, 2.0)
            c = (torch.rand(m, 2, generator=self.g, device=dev) * 2 - 1) * (z - 1)[:, None]
            bgs = _place(torch.cat([bg, torch.ones_like(bg[:, :1])], 1), z, c, torch.zeros(m, device=dev), f)
            canvas[listing] = bgs[:, :3] + (1 - bgs[:, 3:])
            for _ in range(2):  # distractor drawings of other concepts
                other = ids[listing][torch.randperm(m, generator=self.g, device=dev)]
                d = _place(self.sprites(other), self.u(m, 0.15, 0.45),
                           torch.rand(m, 2, generator=self.g, device=dev) * 2.4 - 1.2, self.u(m, -0.2, 0.2), f)
                canvas[listing] = canvas[listing] * (1 - d[:, 3:]) + d[:, :3]
        # the product: on white, fills 0.6-1 of the frame; in a photo, 0.42-0.6 of the whole photo (30%)
        # or 0.55-0.95 of a loose crop around it (70%)
        whole = torch.rand(n, generator=self.g, device=dev) < 0.3
        scale = torch.where(listing, torch.where(whole, self.u(n, 0.42, 0.6), self.u(n, 0.55, 0.95)),
                            self.u(n, 0.6, 1.0))
        room = torch.where(listing & ~whole, torch.full_like(scale, 0.2), 1 - scale)
        centre = (torch.rand(n, 2, generator=self.g, device=dev) * 2 - 1) * room[:, None]
        p = _place(main, scale, centre, self.u(n, -0.15, 0.15), f)
        x = canvas * (1 - p[:, 3:]) + p[:, :3]
        grey = torch.rand(n, generator=self.g, device=dev) < 0.15
        x = torch.where(grey[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)
        x = (x * self.u(n, 0.9, 1.1)[:, None, None, None]).clamp(0, 1)
        mean, std = effnet.MEAN[0], effnet.STD[0]
        return (x - mean) / std


# ---- training ------------------------------------------------------------------------------------
@dataclass
class Recipe:
    name: str
    seconds: float = 120.0  # wall-clock budget of the optimisation (the step count follows from it)
    steps: int | None = None  # or a fixed step count
    batch: int = 512  # concepts per step (two views each)
    lr: float = 1e-4  # trunk
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    tau: float = 0.07
    text_weight: float = 0.0  # InfoNCE toward MiniLM's embedding of the concept's name
    frozen_blocks: int = 0  # the stem and this many MBConv blocks keep their pretrained weights
    colour_side: float = 0.5  # a concept with a colour drawing puts it on one side this often
    seed: int = 0


def load_pack(folder: Path) -> tuple[dict[str, np.ndarray], dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    with np.load(folder / "pack.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((folder / "pack.json").read_text()), load_file(str(folder / "lite0.safetensors"))


class PairSampler:
    """Batches of distinct concepts (every concept once per pass, in a seeded order) and two drawings
    of each by different vendors; icon ids index the glyphs, then the colour drawings."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int = 0, colour_side: float = 0.5):
        self.n_glyphs = len(arrays["glyph_concept"])
        by: dict[int, list[int]] = {}
        for i, c in enumerate(np.concatenate([arrays["glyph_concept"], arrays["colour_concept"]])):
            by.setdefault(int(c), []).append(i)
        self.by = {c: np.array(v) for c, v in by.items() if len(v) >= 2}
        self.rng = np.random.default_rng(seed)
        self.colour_side = colour_side
        self.queue: list[int] = []

    def __call__(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = min(batch, len(self.by))
        cs: list[int] = []
        taken: set[int] = set()
        back: list[int] = []  # a pass may end inside the batch: a concept drawn twice waits for the next
        while len(cs) < batch:  # always exactly ``batch`` (one shape per step: no re-tuned kernels)
            if not self.queue:
                self.queue = self.rng.permutation(sorted(self.by)).tolist()
            c = self.queue.pop(0)
            (back if c in taken else cs).append(c)
            taken.add(c)
        self.queue = back + self.queue
        a, b = [], []
        for c in cs:
            icons = self.by[c]
            col = icons[icons >= self.n_glyphs]
            if len(col) and self.rng.random() < self.colour_side:
                x = int(self.rng.choice(col))
                y = int(self.rng.choice(icons[icons != x]))
            else:
                x, y = (int(v) for v in self.rng.choice(icons, 2, replace=False))
            a.append(x)
            b.append(y)
        return np.array(cs), np.array(a), np.array(b)


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    logits = a @ b.T / tau
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def init_head(model: TunedTower, views: Views, arrays, device: str, n: int = 8192, batch: int = 512) -> None:
    """The head starts as the PCA whitening (shrink 1) of the pool's pretrained GeM features."""
    from moonsearch.models.visual import fit_whitening

    total = len(arrays["glyph_concept"]) + len(arrays["colour_concept"])
    ids = torch.randint(total, (n,), generator=torch.Generator().manual_seed(0)).to(device)  # views differ
    feats = []
    for s in range(0, len(ids), batch):
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda"):
            feats.append(model.pooled(views(ids[s:s + batch])).float().cpu())
    mean, proj = fit_whitening(torch.cat(feats).numpy(), model.head.out_features)
    model.head.weight.copy_(torch.from_numpy(proj.T))
    model.head.bias.copy_(torch.from_numpy(-(mean @ proj)))


def train(folder: Path, recipe: Recipe, device: str = "cpu", frame: int = FRAME, log=print,
          on_half=None) -> tuple[dict, dict]:
    """Fine-tune a tower on the pack in ``folder``; returns (fp16 state, report). ``on_half(state, step)``
    is called half-way (is a shorter run as good?)."""
    arrays, meta, trunk = load_pack(folder)
    dev = torch.device(device)
    torch.manual_seed(recipe.seed)
    model = TunedTower()
    model.trunk.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in trunk.items()})
    model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = False  # autotuning cost seconds per new shape
    views = Views(arrays, device, frame, seed=recipe.seed)
    model.eval()  # batch-norm statistics stay the pretrained ones (affine weights still learn)
    init_head(model, views, arrays, device, n=min(8192, max(4 * recipe.batch, 2 * model.head.out_features)))
    text = torch.from_numpy(arrays["text"].astype(np.float32)).to(dev)
    to_text = nn.Linear(model.head.out_features, text.shape[1]).to(dev)
    frozen = [model.trunk._conv_stem, model.trunk._bn0, *model.trunk._blocks[:recipe.frozen_blocks]]
    for mod in frozen:
        for p in mod.parameters():
            p.requires_grad_(False)
    trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": trunk_params, "lr": recipe.lr},
                             {"params": [*model.head.parameters(), *to_text.parameters()], "lr": recipe.head_lr}],
                            weight_decay=recipe.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    sample = PairSampler(arrays, recipe.seed, recipe.colour_side)
    losses, t0, step, total = [], time.time(), 0, recipe.steps
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    while total is None or step < total:
        cs, a, b = sample(recipe.batch)
        ids = torch.from_numpy(np.concatenate([a, b])).to(dev)
        with torch.no_grad():
            x = views(ids)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        frac = step / total if total else 0.0
        warm = min(1.0, (step + 1) / 20)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        with torch.autocast(**autocast):
            z = model(x)
            za, zb = z[:len(a)], z[len(a):]
            loss = info_nce(za, zb, recipe.tau)
            if recipe.text_weight:
                t = text[torch.from_numpy(cs).to(dev)]
                zt = F.normalize(to_text(z).float(), dim=-1)
                loss = loss + recipe.text_weight * 0.5 * (info_nce(zt[:len(a)], t, recipe.tau)
                                                          + info_nce(zt[len(a):], t, recipe.tau))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if on_half is not None and total and step == total // 2:
            on_half(model.state(), step)
        if step % 10 == 0 or step == 1:
            losses.append((step, loss.detach().item()))
        if total is None and step == 5:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t5 = time.time()
        if total is None and step == 15:  # the budget fixes the step count once the step time is known
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t5) / 10
            total = max(20, int((recipe.seconds - (t5 - t0)) / per) + 5)
            log(f"{recipe.name}: {per * 1000:.0f} ms/step after {t5 - t0:.1f} s of warm-up -> {total} steps")
    elapsed = time.time() - t0
    report = {"recipe": asdict(recipe), "steps": step, "seconds": round(elapsed, 1),
              "images_per_s": round(step * 2 * recipe.batch / elapsed, 1), "loss": losses,
              "concepts": len(meta["concepts"]), "vendors": meta["vendors"],
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    log(f"{recipe.name}: {step} steps in {elapsed:.0f} s, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}")
    return model.state(), report


def save_tower(state: dict[str, torch.Tensor], report: dict, path: Path) -> Path:
    """A tuned tower as safetensors (fp16) with its recipe and provenance in the metadata."""
    from safetensors.torch import save

    from moonsearch.utils.io import atomic_write_bytes

    meta = {"kind": "moonsearch-tuned-tower", "report": json.dumps(report)}
    atomic_write_bytes(save(state, metadata=meta), path)
    return path
