"""The int8 quantiser and what measures it, below the stage commands (`quantize.ptq`, `quantize.target`,
`quantize.bench`, `quantize.litert` import it; `quantize.ptq` re-exports its names).

`quantize_onnx` runs onnxruntime static quantisation with the PReLU rewrites of `quantize.graph`; `raw_embeddings`
and `cosine_rows` compare a model's embeddings with another's; `read_preprocessing` reads a model's preprocessing
from its facekd ONNX metadata.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facekd.io import FacekdError, atomic_path, check_choice

METHODS = ("minmax", "entropy", "percentile", "auto")
FORMATS = ("qdq", "qoperator")
ACTIVATIONS = ("u8", "s8")
PRELU_INT8 = ("mulmax", "max", "float")  # how PReLU is spelled for int8 (see quantize.graph)
ONNX_METADATA_KEY = "facekd"


# ----------------------------------------------------------------------------------------------- models in

def read_preprocessing(path: str | Path) -> dict[str, Any]:
    """The model's preprocessing from its facekd ONNX metadata (insightface default for foreign models)."""
    import onnx

    from evaluate.embed import INSIGHTFACE_PREPROCESSING, check_preprocessing

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            try:
                meta = json.loads(prop.value)
            except json.JSONDecodeError:
                raise FacekdError(f"{path}: facekd metadata is not valid JSON") from None
            if "preprocessing" in meta:
                return check_preprocessing(meta["preprocessing"])
    return dict(INSIGHTFACE_PREPROCESSING)


QUANTIZED_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear")


def check_not_quantized(path: str | Path) -> None:
    """Refuse an ONNX model that is already quantised (its float model is what to quantise)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FacekdError(f"{path} is not a valid ONNX model: {reason}") from None
    ops = sorted({n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS})
    if ops or any(p.key == ONNX_METADATA_KEY and '"quantization"' in p.value for p in proto.metadata_props):
        raise FacekdError(f"{path} is already quantised ({', '.join(ops) or 'facekd quantization metadata'}); "
                          "quantise its float model (the pruned or student model.onnx / model.safetensors) instead")


def _load_onnx(path: Path):
    import onnx

    if not path.is_file():
        raise FacekdError(f"model not found: {path}")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as err:
        raise FacekdError(f"{path} is not a valid ONNX model: {str(err).splitlines()[0]}") from None
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise FacekdError(f"{path}: expected one image input, got {[i.name for i in inputs]}")
    return proto



def _layer_names(proto, which: str) -> list[str]:
    """Node names of the first or last weighted layer (Conv/Gemm/MatMul) in graph order."""
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if not layers:
        return []
    return [(layers[0] if which == "first" else layers[-1]).name]


def _resolve_keep_float(proto, keep_float: Sequence[str]) -> list[str]:
    names = {n.name for n in proto.graph.node}
    out: list[str] = []
    for item in keep_float:
        resolved = _layer_names(proto, item) if item in ("first", "last") else [item]
        for name in resolved:
            if name not in names:
                close = sorted(n for n in names if name.split("/")[-1] in n)[:3]
                raise FacekdError(f"--keep-float: no node named {name!r}" + (f" (similar: {close})" if close else ""))
            out.append(name)
    return out


def quantize_onnx(src: str | Path, dst: str | Path, calib_images: np.ndarray, *, method: str = "minmax",
                  per_channel: bool = True, fmt: str = "qoperator", activations: str = "u8", prelu: str = "mulmax", weights: str = "s8",
                  keep_float: Sequence[str] = (), extra_options: dict[str, Any] | None = None,
                  preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantise the fp32 ONNX `src` to `dst`, calibrating on `calib_images` (uint8 NHWC RGB 112x112).

    `prelu`: "mulmax" (Max(x, a*x): one 8-bit multiply and one 8-bit Max per PReLU; QOperator only), "max"
    (Max of the conv and a twin conv with a*W: no elementwise pass, twice the conv work) or "float" (PRelu left in
    float between Dequantize/Quantize). Returns the settings and what the graph rewrites did.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from quantize.calib import calibration_reader, check_images
    from quantize.graph import PRELU_TAG, compact_names, copy_metadata, fuse_int8_max, fuse_int8_max_qoperator, \
        fuse_int8_mulmax, prelu_fp32_form, prelu_to_minmax, share_twin_weights, share_zero_weight_zero_points

    check_choice(method, METHODS[:-1], "--method")
    check_choice(prelu, PRELU_INT8, "--prelu")
    check_choice(weights, ("s8", "u8"), "--weights")
    if prelu == "mulmax" and fmt != "qoperator":
        raise FacekdError("--prelu mulmax needs --format qoperator (the 8-bit Max is fused on QLinearMul)")
    check_choice(fmt, FORMATS, "--format")
    check_choice(activations, ACTIVATIONS, "--activations")
    src, dst = Path(src).resolve(), Path(dst).resolve()
    original = _load_onnx(src)
    check_not_quantized(src)
    calib_images = check_images(calib_images, "calibration images")
    preprocessing = preprocessing or read_preprocessing(src)
    info: dict[str, Any] = {"method": method, "per_channel": per_channel, "format": fmt, "activations": activations,
                            "weights": ("s8 symmetric" if weights == "s8" else "u8 asymmetric")
                                       + (" per-channel" if per_channel else " per-tensor"),
                            "prelu_form": prelu, "calibration_images": int(len(calib_images))}
    # onnxruntime's symbolic shape inference and external-data paths write helper files (sym_shape_infer_temp.onnx,
    # <uuid>.data) into the working directory: run them inside the temporary directory
    with tempfile.TemporaryDirectory(prefix="facekd-ptq-") as tmp, contextlib.chdir(tmp):
        pre_path = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre_path), skip_symbolic_shape=False)
        except Exception as err:  # symbolic shape inference fails on some graphs; the ONNX one is enough
            quant_pre_process(str(src), str(pre_path), skip_symbolic_shape=True)
            info["pre_process_note"] = f"symbolic shape inference skipped: {str(err).splitlines()[0]}"
        proto = onnx.load(str(pre_path))
        if prelu == "max":
            proto, report = prelu_to_minmax(proto)
            info["prelu"] = {"rewritten": sum(v in ("max", "min") for v in report.values()),
                                     "kept_float": {k: v for k, v in report.items() if v not in ("max", "min")}}
        elif prelu == "mulmax":
            proto, n = prelu_fp32_form(proto, "maxmul")
            info["prelu"] = {"rewritten": n, "kept_float": {}}
        excluded = _resolve_keep_float(proto, keep_float)
        for name in list(excluded):  # a kept-float conv keeps its PReLU twin and Max float too
            excluded += [n.name for n in proto.graph.node if n.name == f"{name}_prelu_scaled"]
        info["keep_float"] = excluded
        rewritten = Path(tmp) / "rewritten.onnx"
        onnx.save(proto, str(rewritten))
        options = {"DedicatedQDQPair": False, **(extra_options or {})}
        if method == "percentile":
            options.setdefault("CalibPercentile", 99.999)
        input_name = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}][0]
        qpath = Path(tmp) / "int8.onnx"
        try:
            quantize_static(
                str(rewritten), str(qpath), calibration_reader(calib_images, preprocessing, input_name),
                quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
                weight_type=QuantType.QInt8 if weights == "s8" else QuantType.QUInt8,
                nodes_to_exclude=excluded or None,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                extra_options=options)
        except FacekdError:
            raise
        except Exception as err:
            raise FacekdError(f"onnxruntime quantize_static failed on {src.name}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        qproto = onnx.load(str(qpath))
    info["extra_options"] = options
    if prelu == "max" and fmt == "qdq":
        qproto, info["int8_max_fused"] = fuse_int8_max(qproto)
        info["twin_weights_shared"] = share_twin_weights(qproto)
    elif prelu == "max":
        qproto, info["int8_max_fused"] = fuse_int8_max_qoperator(qproto)
    elif prelu == "mulmax":
        qproto, info["int8_max_fused"] = fuse_int8_mulmax(qproto)
    if fmt == "qoperator":
        share_zero_weight_zero_points(qproto)
    compact_names(qproto)
    info["onnxruntime"] = _ort_version()
    copy_metadata(original, qproto, quantization=info)
    onnx.checker.check_model(qproto)
    with atomic_path(dst) as tmp_dst:
        onnx.save(qproto, str(tmp_dst))
    info["prelu_tag"] = PRELU_TAG
    return info


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise FacekdError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None


def raw_embeddings(path: str | Path, x: np.ndarray, batch_size: int = 32, threads: int = 1) -> np.ndarray:
    """Embeddings of already-preprocessed float NCHW `x` (no flip, not normalised)."""
    session = _session(path, threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[s:s + batch_size]})[0] for s in range(0, len(x), batch_size)])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(1)

