"""MobileFaceNet (Chen et al. 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification
on Mobile Devices"), Table 1, with its input-size and head variants, and channel overrides for pruning.

Table 1 (112x112 input):

    conv3x3 s2 64 -> depthwise conv3x3 64 -> bottlenecks (t, c, n, s) = (2,64,5,2) (4,128,1,2) (2,128,6,1)
    (4,128,1,2) (2,128,2,1) -> conv1x1 512 -> linear GDConv7x7 (depthwise, kernel = feature map)
    -> linear conv1x1 128 (here Linear(512, 128, bias=False) + BatchNorm1d, as the common reference
    implementations do; identical maths on the 1x1 map)

PReLU after every non-linear conv, BatchNorm after every conv. A bottleneck is MobileNetV2's: 1x1 expand to
t x input channels, depthwise 3x3 (stride s on the first block of a group), linear 1x1 project; a residual
add when stride is 1 and input and output widths are equal.

Variants (the paper, section 3.3, as read here): MobileFaceNet at 112x96 and 96x96 input (the GDConv kernel
follows the final feature map: 7x6 and 6x6); MobileFaceNet-M drops the linear 1x1 conv after GDConv (512-d
embedding = the GDConv output); MobileFaceNet-S additionally drops the 1x1 conv 512 before GDConv (GDConv on
the 128 bottleneck channels -> 128-d). The paper reports -M/-S with 112x96 input; here every variant takes
`input_size`, and the registered -M/-S default to 112x112 so they run on the pipeline's aligned crops as is.

Pruning: `channels` = {"stem": int, "expand": [15 ints], "out": [15 ints], "conv": int | None} overrides every
prunable width; `channel_config(model)` reads them back so a pruned model rebuilds from plain JSON. Which
blocks add a residual is fixed by Table 1, so a residual block's output must keep its input width.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from facekd.io import FacekdError
from facekd.models import preprocessing_for, register_model

# (expansion t, output channels c, repeats n, first stride s)
TABLE1: list[tuple[int, int, int, int]] = [(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1)]
STEM, CONV = 64, 512
ACTIVATIONS = ("prelu", "relu", "leakyrelu")


def make_act(kind: str, channels: int) -> nn.Module:
    """PReLU (the paper) or ReLU / LeakyReLU(0.1), which onnxruntime fuses into the conv (per-channel PReLU not)."""
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.1, inplace=True)
    raise FacekdError(f"unknown activation {kind!r}; choose one of: {', '.join(ACTIVATIONS)}")


class ConvBNAct(nn.Sequential):
    """conv (no bias) + BatchNorm + optional activation; `act=None` is a linear conv."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int] = 1, stride: int = 1, groups: int = 1,
                 act: str | None = None, padding: int | None = None):
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        pad = (k[0] // 2, k[1] // 2) if padding is None else padding
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(make_act(act, cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise (stride), linear 1x1 project (+ identity)."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, act: str, residual: bool):
        super().__init__()
        if residual and cin != cout:
            raise FacekdError(f"residual bottleneck needs equal input and output widths, got {cin} -> {cout}")
        self.expand = ConvBNAct(cin, hidden, 1, act=act)
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=act)
        self.project = ConvBNAct(hidden, cout, 1)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


def _round(c: float) -> int:
    return max(8, int(round(c / 8.0)) * 8)


def table_channels(width: float = 1.0, conv: bool = True) -> dict[str, Any]:
    """Table-1 widths (scaled by `width`, rounded to multiples of 8 when width != 1) as a `channels` dict."""
    scale = (lambda c: c) if width == 1.0 else (lambda c: _round(c * width))
    stem = scale(STEM)
    expand, out, cin = [], [], stem
    for t, c, n, _ in TABLE1:
        for _ in range(n):
            expand.append(t * cin)
            cin = scale(c)
            out.append(cin)
    return {"stem": stem, "expand": expand, "out": out, "conv": scale(CONV) if conv else None}


def _block_plan() -> list[tuple[int, bool]]:
    """(stride, residual) per bottleneck, fixed by Table 1 whatever the widths."""
    plan, cin = [], STEM
    for _, c, n, s in TABLE1:
        for i in range(n):
            stride = s if i == 0 else 1
            plan.append((stride, stride == 1 and cin == c))
            cin = c
    return plan


def _feature_size(size: int) -> int:
    for _ in range(4):  # four stride-2 3x3 convs with padding 1: ceil(size / 2) each
        size = (size + 1) // 2
    return size


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_dim: int = 128, input_size: tuple[int, int] | list[int] = (112, 112),
                 width: float = 1.0, act: str = "prelu", conv: bool = True, linear: bool = True,
                 channels: dict[str, Any] | None = None):
        super().__init__()
        make_act(act, 1)  # validate early, one line
        plan = _block_plan()
        self.base_channels = table_channels(width, conv)
        ch = self._check_channels(channels, len(plan), conv) if channels is not None else self.base_channels
        h, w = int(input_size[0]), int(input_size[1])
        fh, fw = _feature_size(h), _feature_size(w)
        if fh < 1 or fw < 1:
            raise FacekdError(f"input_size {h}x{w} is too small for MobileFaceNet")

        self.stem = ConvBNAct(3, ch["stem"], 3, 2, act=act)
        self.stem_dw = ConvBNAct(ch["stem"], ch["stem"], 3, 1, groups=ch["stem"], act=act)
        blocks, cin = [], ch["stem"]
        for (stride, residual), hidden, cout in zip(plan, ch["expand"], ch["out"]):
            if residual and cin != cout:
                raise FacekdError(f"channels: residual bottleneck {len(blocks)} must keep its input width {cin}, "
                                  f"got out={cout}")
            blocks.append(Bottleneck(cin, hidden, cout, stride, act, residual))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv = ConvBNAct(cin, ch["conv"], 1, act=act) if conv else None
        cin = ch["conv"] if conv else cin
        # Global depthwise conv: one weight per position and channel replaces global average pooling.
        self.gdc = ConvBNAct(cin, cin, (fh, fw), groups=cin, padding=0)
        self.linear = nn.Linear(cin, embedding_dim, bias=False) if linear else None
        self.bn = nn.BatchNorm1d(embedding_dim) if linear else None

        self.embedding_dim = embedding_dim if linear else cin
        self.input_size = (h, w)
        self.preprocessing = preprocessing_for(self.input_size)
        self._init_weights()

    @staticmethod
    def _check_channels(channels: dict[str, Any], n_blocks: int, conv: bool) -> dict[str, Any]:
        try:
            ch = {"stem": int(channels["stem"]), "expand": [int(c) for c in channels["expand"]],
                  "out": [int(c) for c in channels["out"]],
                  "conv": int(channels["conv"]) if conv else None}
        except (KeyError, TypeError, ValueError) as err:
            raise FacekdError(f"channels must be {{'stem': int, 'expand': [{n_blocks} ints], 'out': [{n_blocks} ints], "
                              f"'conv': int}}; got {channels!r} ({err})") from None
        if len(ch["expand"]) != n_blocks or len(ch["out"]) != n_blocks:
            raise FacekdError(f"channels: expand and out need {n_blocks} entries each, "
                              f"got {len(ch['expand'])} and {len(ch['out'])}")
        widths = [ch["stem"], *ch["expand"], *ch["out"]] + ([ch["conv"]] if conv else [])
        if min(widths) < 1:
            raise FacekdError("channels: every width must be >= 1")
        return ch

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def channel_config(self) -> dict[str, Any]:
        return channel_config(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_dw(self.stem(x)))
        if self.conv is not None:
            x = self.conv(x)
        x = torch.flatten(self.gdc(x), 1)
        if self.linear is not None:
            x = self.bn(self.linear(x))
        return x


def channel_config(model: MobileFaceNet) -> dict[str, Any]:
    """Current per-layer widths of a (possibly channel-pruned) MobileFaceNet, as JSON-able `channels` kwargs."""
    return {
        "stem": model.stem[0].out_channels,
        "expand": [b.expand[0].out_channels for b in model.blocks],
        "out": [b.project[0].out_channels for b in model.blocks],
        "conv": model.conv[0].out_channels if model.conv is not None else None,
    }


_VARIANTS: dict[str, dict[str, Any]] = {
    "mobilefacenet": {},
    "mobilefacenet_relu": {"act": "relu"},
    "mobilefacenet_leakyrelu": {"act": "leakyrelu"},
    "mobilefacenet_112x96": {"input_size": [112, 96]},
    "mobilefacenet_96x96": {"input_size": [96, 96]},
    "mobilefacenet_m": {"linear": False},
    "mobilefacenet_s": {"linear": False, "conv": False},
}


def _register(name: str, defaults: dict[str, Any]) -> None:
    @register_model(name, kind="student", **defaults)
    def build(**kwargs: Any) -> MobileFaceNet:
        return MobileFaceNet(**kwargs)

    build.__name__ = name


for _name, _defaults in _VARIANTS.items():
    _register(_name, _defaults)
