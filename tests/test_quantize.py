"""quantize: PReLU rewrite exactness, int8 fidelity on a small PReLU face net, metadata, calibration errors, bnstats."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from facekd.io import FacekdError
from quantize.calib import check_images, load_calibration_images, preprocess
from quantize.graph import prelu_to_minmax
from quantize.ptq import cosine_rows, main as ptq_main, quantize_onnx, raw_embeddings, read_preprocessing

PRE = {"input_size": [112, 112], "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3}


class TinyFaceNet(nn.Module):
    """MobileFaceNet in miniature: conv-BN-PReLU, depthwise, linear bottleneck with residual, GDC-like head."""

    def __init__(self, slopes: str = "normal") -> None:
        super().__init__()
        def cbp(i, o, k, s, g=1, act=True):
            layers = [nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o)]
            return nn.Sequential(*layers, nn.PReLU(o)) if act else nn.Sequential(*layers)
        self.stem = cbp(3, 16, 3, 4)
        self.dw = cbp(16, 16, 3, 2, g=16)
        self.expand, self.dw2, self.project = cbp(16, 32, 1, 1), cbp(32, 32, 3, 1, g=32), cbp(32, 16, 1, 1, act=False)
        self.conv = cbp(16, 32, 1, 1)
        self.gdc = nn.Sequential(nn.Conv2d(32, 32, 14, groups=32, bias=False), nn.BatchNorm2d(32))
        self.linear, self.bn = nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16)
        self.embedding_dim, self.input_size, self.preprocessing = 16, (112, 112), dict(PRE)
        g = torch.Generator().manual_seed(0)
        for m in self.modules():
            if isinstance(m, nn.PReLU):
                m.weight.data = torch.rand(m.weight.shape, generator=g) * 0.5 + 0.05
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.data.uniform_(0.5, 1.5, generator=g)
        if slopes == "mixed":  # all > 1 (Min); both sides of 1 (sign-folded Max); both sides, read by a Linear (kept)
            self.dw[2].weight.data = torch.full((16,), 1.5)
            self.conv[2].weight.data[:4] = 1.7
            self.conv[2].weight.data[4:8] = -0.3
            self.dw2[2].weight.data[::3] = 1.3
            self.head_act = nn.PReLU(32)
            self.head_act.weight.data = torch.linspace(-0.5, 2.0, 32)

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = x + self.project(self.dw2(self.expand(x)))
        x = torch.flatten(self.gdc(self.conv(x)), 1)
        if hasattr(self, "head_act"):
            x = self.head_act(x)
        return self.bn(self.linear(x))


def _export(model: nn.Module, path: Path) -> Path:
    model.eval()
    torch.onnx.export(model, (torch.zeros(2, 3, 112, 112),), str(path), input_names=["input"],
                      output_names=["embedding"], dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                      opset_version=17, dynamo=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "facekd", json.dumps({"arch": "tiny", "embedding_dim": 16, "preprocessing": PRE})
    extra = proto.metadata_props.add()
    extra.key, extra.value = "author", "test"
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return load_calibration_images("synthfaces:tiny", 48, seed=0)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    return _export(TinyFaceNet(), tmp_path_factory.mktemp("q") / "tiny.onnx")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_prelu_rewrite_is_exact_in_float(tmp_path, faces):
    src = _export(TinyFaceNet("mixed"), tmp_path / "mixed.onnx")
    proto, report = prelu_to_minmax(onnx.load(str(src)))
    assert list(report.values()).count("max") == 4                     # incl. two sign-folded mixed layers
    assert list(report.values()).count("min") == 1                     # slopes all > 1: Min(y, a*y)
    assert sum(v.startswith("kept") for v in report.values()) == 1     # input not a Conv output: stays PRelu
    assert sum(n.op_type == "PRelu" for n in proto.graph.node) == 1
    rewritten = tmp_path / "rewritten.onnx"
    onnx.save(proto, str(rewritten))
    x = preprocess(faces[:8], PRE)
    want, got = (_session(p).run(None, {"input": x})[0] for p in (src, rewritten))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,prelu", [("qoperator", "max"), ("qoperator", "mulmax"), ("qdq", "max")])
def test_int8_close_to_fp32_valid_and_keeps_metadata(tmp_path, tiny_onnx, faces, fmt, prelu):
    dst = tmp_path / "int8.onnx"
    info = quantize_onnx(tiny_onnx, dst, faces[:32], fmt=fmt, prelu=prelu)
    proto = onnx.load(str(dst))
    onnx.checker.check_model(proto)
    _session(dst)  # loads
    # fidelity on images the calibration never saw
    x = preprocess(faces[32:], PRE)
    cos = cosine_rows(raw_embeddings(tiny_onnx, x), raw_embeddings(dst, x))
    assert cos.mean() > 0.98 and cos.min() > 0.95, cos
    # every PReLU became an 8-bit Max fed straight by the 8-bit conv outputs (no float island left)
    assert info["prelu"]["rewritten"] == 5 and info["int8_max_fused"] == 5
    producers = {o: n for n in proto.graph.node for o in n.output}
    maxes = [n for n in proto.graph.node if n.op_type == "Max"]
    assert len(maxes) == 5 and not any(n.op_type == "PRelu" for n in proto.graph.node)
    eight_bit = {"qdq": ("QuantizeLinear",), "qoperator": ("QLinearConv", "QLinearMul")}[fmt]
    assert all(producers[i].op_type in eight_bit for n in maxes for i in n.input)
    # twins reuse the original int8 weights: one int8 weight tensor per original conv/linear, not per twin
    int8_tensors = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8_tensors) == 8
    # metadata survives, plus the quantisation settings; evaluate's reader sees the same preprocessing
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["author"] == "test"
    meta = json.loads(props["facekd"])
    assert meta["preprocessing"] == PRE and meta["embedding_dim"] == 16
    assert meta["quantization"]["method"] == "minmax" and meta["quantization"]["per_channel"] is True
    assert read_preprocessing(dst)["mean"] == PRE["mean"]
    assert not [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]


def test_keep_float_first_layer(tmp_path, tiny_onnx, faces):
    dst = tmp_path / "int8_keep.onnx"
    info = quantize_onnx(tiny_onnx, dst, faces[:16], keep_float=["first"], prelu="max")
    assert len(info["keep_float"]) == 2  # the stem conv and its PReLU twin
    proto = onnx.load(str(dst))
    assert sum(n.op_type == "Conv" and n.name in info["keep_float"] for n in proto.graph.node) == 2
    with pytest.raises(FacekdError, match="no node named"):
        quantize_onnx(tiny_onnx, tmp_path / "x.onnx", faces[:16], keep_float=["/nope/Conv"])


def _write(folder: Path, images: list[np.ndarray], mode: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img, mode=mode).save(folder / f"{i}.png") if mode else Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def test_calibration_set_errors(tmp_path, faces):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no faces here")
    with pytest.raises(FacekdError, match="holds no images"):
        load_calibration_images(str(empty))
    grey = _write(tmp_path / "grey", [faces[0].mean(-1).astype(np.uint8)] * 2)
    with pytest.raises(FacekdError, match=r"mode L \(1 channels\)"):
        load_calibration_images(str(grey))
    small = _write(tmp_path / "small", [faces[0][:64, :64]] * 2)
    with pytest.raises(FacekdError, match="is 64x64; need aligned 112x112"):
        load_calibration_images(str(small))
    good = _write(tmp_path / "good", list(faces[:3]))
    np.testing.assert_array_equal(load_calibration_images(str(good), 10), faces[:3])
    with pytest.raises(FacekdError, match="1 channel"):
        check_images(np.zeros((4, 112, 112), np.uint8), "arr")
    with pytest.raises(FacekdError, match=r"got shape \(4, 96, 96, 3\)"):
        check_images(np.zeros((4, 96, 96, 3), np.uint8), "arr")
    with pytest.raises(FacekdError, match="blank"):
        check_images(np.full((4, 112, 112, 3), 7, np.uint8), "arr")
    with pytest.raises(FacekdError, match="not found"):
        load_calibration_images(str(tmp_path / "missing"))


def test_cli_errors_are_one_line(tmp_path, tiny_onnx, capsys):
    for argv, expect in [([str(tiny_onnx), "--calib", "bnstats"], "needs a facekd checkpoint"),
                         ([str(tiny_onnx), "--method", "kl"], "--method: unknown value 'kl'"),
                         ([str(tmp_path / "none.onnx")], "model not found")]:
        with pytest.raises(SystemExit) as exc:
            ptq_main(argv + ["--out", str(tmp_path / "o"), "--eval", "none"])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expect in err and "\n" not in err


def test_bnstats_synthesis_matches_bn_statistics(faces):
    from quantize.bnstats import bn_match_error, synthesize

    model = TinyFaceNet().train()
    for m in model.modules():  # BatchNorm statistics of face images, as training leaves them
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(torch.from_numpy(preprocess(faces, PRE)))
    model.eval()
    noise = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    images = synthesize(model, 8, steps=30, batch_size=8, lr=0.15, progress=False)
    assert images.shape == (8, 112, 112, 3) and images.dtype == np.uint8
    assert bn_match_error(model, images) < 0.5 * bn_match_error(model, noise)
    with pytest.raises(FacekdError, match="BatchNorm"):
        synthesize(_with_pre(nn.Sequential(nn.Conv2d(3, 4, 3))), 2, steps=1)


def _with_pre(model: nn.Module) -> nn.Module:
    model.preprocessing = dict(PRE)
    return model.eval()


@pytest.mark.slow
def test_cli_end_to_end_report(tmp_path, tiny_onnx):
    out = tmp_path / "int8"
    results = tmp_path / "summary.csv"
    assert ptq_main([str(tiny_onnx), "--calib", "synthfaces:tiny", "--num-calib", "24", "--eval", "synthfaces:tiny",
                     "--runs", "5", "--no-profile", "--out", str(out), "--results", str(results)]) == 0
    report = json.loads((out / "fidelity.json").read_text())
    assert report["dataset"] == "synthfaces:tiny" and report["pairs"] == 60
    assert 0.95 < report["cosine"]["mean"] <= 1.0 and report["cosine"]["p1"] <= report["cosine"]["mean"]
    assert set(report["metrics"]) == {"fp32", "int8"} and report["latency"]["int8_ms"] > 0
    assert report["file_bytes"]["int8"] == (out / "model_int8.onnx").stat().st_size
    from facekd.table import read_rows

    rows = read_rows(results)
    assert [(r["stage"], r["dataset"]) for r in rows] == [("int8", "synthfaces:tiny")]
    assert float(rows[0]["accuracy"]) == pytest.approx(report["metrics"]["int8"]["accuracy"])


def test_bench_table_side_by_side(tiny_onnx, faces, tmp_path):
    from quantize.bench import compare

    lines: list[str] = []
    rows = compare(tiny_onnx, faces[:16], None, runs=3, variants=["qop-u8-max", "fp32-max"], log=lines.append,
                   out=tmp_path / "bench.json")
    assert [r["key"] for r in rows] == ["fp32", "qop-u8-max", "fp32-max"]  # fp32 reference always first
    assert all(r["latency_ms"] > 0 for r in rows)  # ratios are against the fastest fp32 form timed
    assert min(rows[0]["latency_ratio"], rows[2]["latency_ratio"]) == 1.0
    assert rows[1]["size_ratio"] < 0.8 and "QLinearConv" in rows[1]["top_ops"] and "PRelu" not in rows[1]["top_ops"]
    assert "PRelu" in rows[0]["top_ops"] and "PRelu" not in rows[2]["top_ops"]
    assert any(line.startswith("fp32 + PReLU->Max rewrite") for line in lines[-1].splitlines())
    assert json.loads((tmp_path / "bench.json").read_text())["runs"] == 3


def test_auto_method_keeps_best_held_out_cosine(tiny_onnx, faces, tmp_path):
    from quantize.ptq import choose_method

    dst = tmp_path / "auto.onnx"
    info, scores = choose_method(tiny_onnx, dst, faces[:20], log=lambda *_: None)  # 15 fit (ragged batches) + 5 held out
    assert set(scores) == {"minmax", "entropy", "percentile"}
    assert info["auto"]["chosen"] == max(scores, key=scores.get) == info["method"]
    assert info["auto"]["held_out_images"] == 5 and min(scores.values()) > 0.95
    onnx.checker.check_model(onnx.load(str(dst)))
