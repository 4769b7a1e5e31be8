"""The offline default core-product detector: a box head on frozen EfficientNet-Lite0 feature maps,
trained by ``moonsearch fit-detector`` on the synthetic world's ground-truth core boxes.

feature map (1280, h, w) -> 1x1 conv to 64 -> flatten -> MLP -> (cx, cy, w, h) in [0, 1] (sigmoid).
Loss: L1 on the box plus (1 - GIoU). The head file (~2 MB safetensors) is committed; when it is
missing the cropper falls back to the classical saliency box.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moonsearch.data.images import to_rgb
from moonsearch.models import efficientnet_lite as eff
from moonsearch.models.towers import feature_map, pil_to_tensor
from moonsearch.vision.croppers import SaliencyCropper

HEAD_FILE = Path(__file__).parent / "assets" / "detector_head.safetensors"
SIZE = 160
GRID = 5  # 160 / 32


class BoxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(eff.FEATURE_DIM, 64, 1)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(64 * GRID * GRID, 256), nn.ReLU(), nn.Linear(256, 4))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:  # (B, 1280, 5, 5) -> (B, 4) cx, cy, w, h in [0, 1]
        return torch.sigmoid(self.mlp(torch.relu(self.reduce(fmap))))


def to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def giou_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - generalised IoU for (B, 4) xyxy boxes."""
    ix = (torch.min(p[:, 2], t[:, 2]) - torch.max(p[:, 0], t[:, 0])).clamp(min=0)
    iy = (torch.min(p[:, 3], t[:, 3]) - torch.max(p[:, 1], t[:, 1])).clamp(min=0)
    inter = ix * iy
    area = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
    union = area(p) + area(t) - inter
    hull = (torch.max(p[:, 2], t[:, 2]) - torch.min(p[:, 0], t[:, 0])) * \
           (torch.max(p[:, 3], t[:, 3]) - torch.min(p[:, 1], t[:, 1]))
    giou = inter / union.clamp(min=1e-6) - (hull - union) / hull.clamp(min=1e-6)
    return (1 - giou).mean()


class DetectorCropper:
    name = "detector"

    def __init__(self, head_path: Path | None = None):
        from safetensors.torch import load_file

        from moonsearch.models.towers import _effnet

        path = head_path or HEAD_FILE
        self.fallback = None
        if not path.exists():
            self.fallback = SaliencyCropper()
            return
        self.backbone = _effnet()
        self.head = BoxHead()
        self.head.load_state_dict(load_file(str(path)))
        self.head.eval()

    def box(self, image, title=""):
        return self.boxes([image])[0]

    @torch.inference_mode()
    def boxes(self, images, batch_size: int = 32) -> list[tuple[int, int, int, int]]:
        """Boxes for many images, run through the backbone in batches."""
        if self.fallback is not None:
            return [self.fallback.box(im) for im in images]
        out = []
        for s in range(0, len(images), batch_size):
            part = images[s:s + batch_size]
            x = pil_to_tensor([to_rgb(im).resize((SIZE, SIZE)) for im in part], SIZE, eff.MEAN, eff.STD)
            pred = to_xyxy(self.head(feature_map(self.backbone, x))).clamp(0, 1).tolist()
            for im, b in zip(part, pred):
                w, h = im.size
                box = (int(b[0] * w), int(b[1] * h), int(np.ceil(b[2] * w)), int(np.ceil(b[3] * h)))
                out.append(box if box[2] - box[0] >= 4 and box[3] - box[1] >= 4 else SaliencyCropper().box(im))
        return out


def fit(n: int = 3000, seed: int = 4242, epochs: int = 60, out: Path = HEAD_FILE, log=print) -> Path:
    """Train the box head on ``n`` fresh listing photos (seed unused by the demo or the evaluation)."""
    from safetensors.torch import save_file

    from moonsearch.data.render import render
    from moonsearch.data.synthetic import sample_specs
    from moonsearch.models.towers import _effnet
    from moonsearch.utils.io import atomic_path

    rng = np.random.default_rng(seed)
    t0 = time.time()
    samples = [render(s, rng, SIZE, "listing") for s in sample_specs(n, seed)]
    backbone = _effnet()
    fmaps = []
    with torch.inference_mode():
        for s in range(0, n, 64):
            x = pil_to_tensor([img for img, _ in samples[s:s + 64]], SIZE, eff.MEAN, eff.STD)
            fmaps.append(backbone.feature_map(x))
    fmaps = torch.cat(fmaps).clone()  # (n, 1280, 5, 5)
    boxes = torch.tensor([b for _, b in samples], dtype=torch.float32) / SIZE  # (n, 4) xyxy
    log(f"features for {n} photos in {time.time() - t0:.0f}s")
    torch.manual_seed(seed)
    head = BoxHead()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    n_val = n // 10
    for ep in range(epochs):
        perm = torch.randperm(n - n_val) + n_val
        for s in range(0, len(perm), 128):
            idx = perm[s:s + 128]
            pred = to_xyxy(head(fmaps[idx]))
            loss = (pred - boxes[idx]).abs().mean() + giou_loss(pred, boxes[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep % 20 == 0 or ep == epochs - 1:
            with torch.no_grad():
                val = giou_loss(to_xyxy(head(fmaps[:n_val])), boxes[:n_val]).item()
            log(f"epoch {ep}: train loss {loss.item():.3f}, validation 1-GIoU {val:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp))
    return out
