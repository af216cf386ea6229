"""Any timm backbone as a face model (`timm:NAME`): its feature map, then an ArcFace-style embedding head.

Head: BatchNorm2d -> dropout -> flatten -> Linear(C*h*w -> embedding_dim) -> BatchNorm1d, as IResNet's, so
spatial layout survives (faces are aligned; global pooling throws position away). Weights are never
downloaded: `pretrained=True` is honoured only with a local file (`create_model(..., checkpoint_path=FILE)`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from facekd.io import FacekdError
from facekd.models import preprocessing_for, register_prefix


class TimmFaceNet(nn.Module):
    def __init__(self, name: str, embedding_dim: int = 512, dropout: float = 0.0,
                 input_size: tuple[int, int] | list[int] = (112, 112), pretrained: bool = False,
                 pretrained_file: str | None = None, **timm_kwargs: Any):
        super().__init__()
        try:
            import timm
        except ImportError as err:  # an optional extra: timm brings torchvision, which a CPU-only torch may lack
            raise FacekdError(f"timm:{name} needs timm: pip install -e '.[timm]' ({err})") from None

        if pretrained and not pretrained_file:
            raise FacekdError(f"timm:{name}: pretrained weights are never downloaded; give a local file")
        if not timm.is_model(name):
            raise FacekdError(f"timm has no model {name!r} (see timm.list_models())")
        extra: dict[str, Any] = {}
        if pretrained:
            extra["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        self.body = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, global_pool="",
                                      **extra, **timm_kwargs)
        h, w = int(input_size[0]), int(input_size[1])
        device = next(self.body.parameters()).device
        with torch.no_grad():
            was = self.body.training
            self.body.eval()
            feat = self.body(torch.zeros(1, 3, h, w, device=device))
            self.body.train(was)
        if feat.dim() != 4:
            raise FacekdError(f"timm:{name} gives {tuple(feat.shape)} features, not a (B, C, H, W) map; "
                              "only convolutional backbones are supported")
        c, fh, fw = feat.shape[1:]
        self.bn2 = nn.BatchNorm2d(c)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c * fh * fw, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        self.embedding_dim = embedding_dim
        self.input_size = (h, w)
        self.preprocessing = preprocessing_for(self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.bn2(self.body(x)), 1)
        return self.features(self.fc(self.dropout(x)))


@register_prefix("timm", kind="any")
def timm_model(name: str, **kwargs: Any) -> TimmFaceNet:
    return TimmFaceNet(name, **kwargs)
