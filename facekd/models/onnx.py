"""ONNX files: export with facekd metadata, read that metadata back, and repair foreign files so they run.

The `facekd` metadata_props entry is JSON with arch, kwargs, embedding_dim, input_size and preprocessing (plus what
the caller adds), so an exported file describes itself the way a checkpoint does.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facekd.io import FacekdError, atomic_path, atomic_write_bytes, cache_root
from facekd.models.checkpoints import model_description
from facekd.models.registry import _evaluating

ONNX_METADATA_KEY = "facekd"


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17, metadata: dict[str, Any] | None = None) -> Path:
    """Export to ONNX with a dynamic batch axis (input `input`, output `embedding`) and facekd metadata.

    Uses the TorchScript exporter (`dynamo=False`): it is several times faster than the dynamo exporter on
    these CNNs and folds BatchNorm into the preceding conv in eval mode, like onnxruntime would. The
    `facekd` metadata_props entry is JSON with arch, kwargs, embedding_dim, input_size, preprocessing (+ `metadata`).
    """
    import onnx
    import warnings

    path = Path(path)
    description = model_description(model) if getattr(model, "arch", None) else {
        "arch": type(model).__name__, "kwargs": {}, "embedding_dim": int(model.embedding_dim),
        "input_size": list(model.input_size), "preprocessing": model.preprocessing}
    description.update(metadata or {})
    h, w = model.input_size
    with _evaluating(model) as device, atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, h, w, device=device),), str(tmp), input_names=["input"],
                          output_names=["embedding"], dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(description, sort_keys=True)
        proto.producer_name = "facekd"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, Any] | None:
    """The facekd JSON of an ONNX file's metadata_props, or None for a foreign ONNX model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise FacekdError(f"cannot read ONNX model {path}: {err}") from None
    for prop in proto.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return json.loads(prop.value)
    return None


def runnable_onnx(path: str | Path) -> Path:
    """`path`, or a repaired copy in the cache when the file needs it to run with any batch size.

    Old converters and re-quantisers (SFace's int8bq file) list weights, even unused ones, as graph inputs, which
    onnxruntime then demands at run time, and fix the batch dimension to 1. The copy keeps only the inputs that
    a node reads and nothing produces, and makes the first input/output dimension `batch`. Block-quantised
    weights (DequantizeLinear with a block_size, which no int8 kernel consumes) are dequantised into float
    initializers: onnxruntime keeps DequantizeLinear in the graph (it never constant-folds it), so every run
    re-dequantises and convolutions lose their pre-packed weights; folded, SFace runs ~1.3x faster with the same
    float weights ((q - zero) * scale). Per-tensor/per-channel QDQ weights are left alone: those fuse into int8 kernels.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as err:
        raise FacekdError(f"cannot read ONNX model {path}: {err}") from None
    produced = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node for o in n.output}
    consumed = {name for n in proto.graph.node for name in n.input}
    inputs = [i for i in proto.graph.input if i.name not in produced and i.name in consumed]
    changed = len(inputs) != len(proto.graph.input)
    if len(inputs) != 1:
        raise FacekdError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    if changed:
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
    changed |= _fold_weight_dequantize(proto.graph)
    for value in (proto.graph.input[0], *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
            changed = True
    if not changed:
        return path
    data = proto.SerializeToString()
    fixed = cache_root() / "onnx" / f"{path.stem}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"
    if not fixed.is_file():
        atomic_write_bytes(fixed, data)
    return fixed


def _fold_weight_dequantize(graph: Any) -> bool:
    """Replace block-wise DequantizeLinear (and a following Reshape) of initializers by float initializers."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    folded: dict[str, np.ndarray] = {}

    def constant(name: str) -> np.ndarray | None:  # converted on demand: a large float model is never copied
        if name in folded:
            return folded[name]
        return numpy_helper.to_array(inits[name]) if name in inits else None

    keep = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(n in folded or n in inits for n in node.input):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            block = attrs.get("block_size", 0)
            q, scale, *rest = [constant(name) for name in node.input]
            if block > 0 and scale.ndim == q.ndim:
                zero = rest[0] if rest else np.zeros_like(scale, dtype=q.dtype)
                axis = attrs.get("axis", 1) % q.ndim
                # each scale (and zero point) covers `block` consecutive elements along `axis`, the last block partly
                scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
                folded[node.output[0]] = ((q.astype(np.float32) - zero.astype(np.float32)) * scale).astype(np.float32)
                continue
        elif node.op_type == "Reshape" and node.input[0] in folded and len(node.input) == 2:
            shape = constant(node.input[1])
            if shape is not None:
                folded[node.output[0]] = folded[node.input[0]].reshape(shape)
                continue
        keep.append(node)
    if not folded:
        return False
    used = {name for node in keep for name in node.input} | {o.name for o in graph.output}
    initializers = [t for t in graph.initializer if t.name in used]
    initializers += [numpy_helper.from_array(v, name) for name, v in folded.items() if name in used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(keep)
    graph.initializer.extend(initializers)
    return True
