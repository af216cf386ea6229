"""insightface arcface_torch's MobileFaceNet ("mbf", "mbf_large"), module for module, so its checkpoints load strictly.

This is not the paper's Table 1: widths scale with `scale` (2 for mbf: 128-channel stem), the first depthwise
conv uses 64 groups, expansion widths are fixed group counts (128/256/512), and the embedding is 512-d.
Module names (`layers.N.layers...`, `conv_sep`, `features`) equal insightface's (checked against
`tests/data/insightface_state_dicts.json`). No fp16 autocast inside forward: mixed precision is the caller's.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from facekd.models import preprocessing_for, register_model, resolve_embedding_dim


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 to `groups` channels, depthwise 3x3 (stride), linear 1x1 back, optional identity."""

    def __init__(self, cin: int, cout: int, residual: bool = False, stride=(2, 2), groups: int = 1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(cin, groups),
                                    ConvBlock(groups, groups, (3, 3), stride, (1, 1), groups=groups),
                                    LinearBlock(groups, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c: int, num_block: int, groups: int):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, (1, 1), groups) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(LinearBlock(512, 512, (7, 7), (1, 1), (0, 0), groups=512), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class InsightfaceMobileFaceNet(nn.Module):
    def __init__(self, num_features: int = 512, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2,
                 fp16: bool = False, embedding_dim: int | None = None):
        # `fp16` is accepted for insightface config compatibility and ignored; `embedding_dim` = `num_features`.
        super().__init__()
        num_features = resolve_embedding_dim(num_features, embedding_dim)
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, (3, 3), (2, 2), (1, 1))])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, (3, 3), (1, 1), (1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c1, c1, stride=(2, 2), groups=128),
            Residual(c1, blocks[1], groups=128),
            DepthWise(c1, c2, stride=(2, 2), groups=256),
            Residual(c2, blocks[2], groups=256),
            DepthWise(c2, c2, stride=(2, 2), groups=512),
            Residual(c2, blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(num_features)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.embedding_dim = num_features
        self.input_size = (112, 112)
        self.preprocessing = preprocessing_for(self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


@register_model("mbf", kind="student", blocks=[1, 4, 6, 2], scale=2)
def mbf(**kwargs: Any) -> InsightfaceMobileFaceNet:
    return InsightfaceMobileFaceNet(**kwargs)


@register_model("mbf_large", kind="student", blocks=[2, 8, 12, 4], scale=4)
def mbf_large(**kwargs: Any) -> InsightfaceMobileFaceNet:
    return InsightfaceMobileFaceNet(**kwargs)
