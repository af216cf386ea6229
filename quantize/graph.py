"""ONNX graph rewrites that make an int8 MobileFaceNet run fully in int8 on onnxruntime's CPU kernels.

onnxruntime has no int8 PRelu kernel, and its float PRelu is ~10x slower than a Mul with the same broadcast,
so a PReLU network quantised as-is spends most of its time in float PRelu islands between Dequantize/Quantize.
The rewrite here is exact in float and maps onto kernels that exist in int8:

    PRelu(Conv(x; W, b)) = Max(Conv(x; W, b), Conv(x; a*W, a*b))      per channel, when every slope a <= 1
                         = Min(...)                                     when every slope a >= 1

(for a <= 1: y >= 0 gives y >= a*y, y < 0 gives a*y >= y). After quantisation both convolutions become
QLinearConv and, once their outputs share one scale/zero point (`fuse_int8_max`), Max runs on uint8 directly:
quantisation with shared parameters is monotone, so Max commutes with it exactly.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

PRELU_TAG = "_prelu_as_max"  # suffix of the Max/Min nodes made by `prelu_to_minmax`; `fuse_int8_max` looks for it
MULMAX_TAG = "_prelu_as_mulmax"  # suffix of the Max/Min nodes of the "maxmul" form; `fuse_int8_mulmax` looks for it


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: node for node in graph.node for o in node.output}


def prelu_to_minmax(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Rewrite every Conv -> PRelu pair as Max/Min of two convolutions (exact in float; see module docstring).

    Returns the new model and, per PRelu node, what happened ("max", "min", or why it was kept), so a caller can
    report PRelus left as float islands (mixed slopes around 1, slopes not constant, no Conv in front).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers, producers = _consumers(graph), _producers(graph)
    graph_outputs = {o.name for o in graph.output}
    report: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type != "PRelu":
            continue
        conv = producers.get(node.input[0])
        why = None
        if conv is None or conv.op_type != "Conv":
            why = "kept: input is not a Conv output"
        elif len(consumers[conv.output[0]]) != 1 or conv.output[0] in graph_outputs:
            why = "kept: conv output has other consumers"
        elif node.input[1] not in inits or conv.input[1] not in inits:
            why = "kept: slope or weight is not a constant"
        if why is None:
            weight = numpy_helper.to_array(inits[conv.input[1]])
            cout = weight.shape[0]
            slope = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64).reshape(-1)
            if slope.size == 1:
                slope = np.full(cout, slope[0])
            if slope.size != cout:
                why = f"kept: slope has {slope.size} values for {cout} channels"
            elif np.all(slope <= 1):
                op = "Max"
            elif np.all(slope >= 1):
                op = "Min"
            elif _fold_signs(graph, inits, conv, node, slope, consumers, graph_outputs):
                op = "Max"  # channels with a > 1 now compute -PRelu = Max(-y, -a*y); consumers negate them back
                weight = numpy_helper.to_array(inits[conv.input[1]])
            else:
                why = "kept: slopes on both sides of 1 and a consumer that cannot absorb a sign"
        if why is not None:
            report[node.name] = why
            continue
        scaled_w = numpy_helper.from_array((weight * slope.reshape(-1, *[1] * (weight.ndim - 1))).astype(weight.dtype),
                                           f"{conv.name}_prelu_scaled_W")
        graph.initializer.append(scaled_w)
        inputs = [conv.input[0], scaled_w.name]
        if len(conv.input) > 2 and conv.input[2]:
            bias = numpy_helper.to_array(inits[conv.input[2]])
            scaled_b = numpy_helper.from_array((bias * slope).astype(bias.dtype), f"{conv.name}_prelu_scaled_B")
            graph.initializer.append(scaled_b)
            inputs.append(scaled_b.name)
        twin_out = f"{conv.output[0]}_prelu_scaled"
        twin = helper.make_node("Conv", inputs, [twin_out], name=f"{conv.name}_prelu_scaled")
        twin.attribute.extend(conv.attribute)
        minmax = helper.make_node(op, [conv.output[0], twin_out], [node.output[0]], name=f"{node.name}{PRELU_TAG}")
        replaced[id(conv)] = [conv, twin]
        replaced[id(node)] = [minmax]
        report[node.name] = op.lower()
    for node in graph.node:
        new_nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return model, report


FP32_FORMS = ("prelu", "relu", "maxmul", "max")


def prelu_fp32_form(model: onnx.ModelProto, form: str) -> tuple[onnx.ModelProto, int]:
    """Rewrite every PRelu with a constant slope into an equivalent float form; returns (model, nodes rewritten).

    onnxruntime's PRelu kernel is a generic broadcast loop, several times slower than its vectorised elementwise
    kernels, so the fastest *exact* fp32 model spells PReLU with those:
    - "relu":   a*x + (1-a)*Relu(x)                 (any slopes; equal to PRelu within one float rounding)
    - "maxmul": Max(x, a*x) when every a <= 1, Min(x, a*x) when every a >= 1 (bit-exact: the same a*x);
                a PRelu with slopes on both sides of 1 gets the "relu" form
    - "max":    Max(Conv(x; W), Conv(x; a*W)) (`prelu_to_minmax`; the int8 rewrite, twice the conv work in float)
    - "prelu":  unchanged
    """
    if form not in FP32_FORMS:
        raise ValueError(f"unknown PReLU form {form!r}; choose from {FP32_FORMS}")
    if form == "prelu":
        return onnx.ModelProto.FromString(model.SerializeToString()), 0
    if form == "max":
        out, report = prelu_to_minmax(model)
        return out, sum(v in ("max", "min") for v in report.values())
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type != "PRelu" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        slope = numpy_helper.to_array(inits[node.input[1]])
        x, y, base = node.input[0], node.output[0], node.name or node.output[0]
        a_name = f"{base}_slope"
        graph.initializer.append(numpy_helper.from_array(slope.astype(np.float32), a_name))
        mul = helper.make_node("Mul", [x, a_name], [f"{base}_ax"], name=f"{base}_ax")
        if form == "maxmul" and (np.all(slope <= 1) or np.all(slope >= 1)):
            op = "Max" if np.all(slope <= 1) else "Min"
            new_nodes += [mul, helper.make_node(op, [x, mul.output[0]], [y], name=f"{base}{MULMAX_TAG}")]
        else:
            b_name = f"{base}_one_minus_slope"
            graph.initializer.append(numpy_helper.from_array((1 - slope.astype(np.float64)).astype(np.float32),
                                                             b_name))
            relu = helper.make_node("Relu", [x], [f"{base}_relu"], name=f"{base}_relu")
            mul2 = helper.make_node("Mul", [relu.output[0], b_name], [f"{base}_brelu"], name=f"{base}_brelu")
            new_nodes += [mul, relu, mul2, helper.make_node("Add", [mul.output[0], mul2.output[0]], [y],
                                                            name=f"{base}_add")]
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph)
    return model, count


def _fold_signs(graph: onnx.GraphProto, inits: dict, conv: onnx.NodeProto, prelu: onnx.NodeProto, slope: np.ndarray,
                consumers: dict, graph_outputs: set[str]) -> bool:
    """Make a PReLU with slopes on both sides of 1 rewritable as one Max: negate the channels with a > 1.

    For those channels the conv computes -y, Max(-y, -a*y) = -Min(y, a*y) = -PRelu(y), and every consumer (convs
    only) multiplies that input channel by -1 again, which is exact. Returns False (graph untouched) when a
    consumer cannot absorb the sign. The twin conv is then a * (sign-folded W), as for any other layer.
    """
    readers = consumers[prelu.output[0]]
    if prelu.output[0] in graph_outputs or not readers:
        return False
    for r in readers:
        if r.op_type != "Conv" or list(r.input).count(prelu.output[0]) != 1 or r.input[0] != prelu.output[0] \
                or r.input[1] not in inits:
            return False
    sign = np.where(slope > 1, -1.0, 1.0)
    # the producing conv computes sign * y
    w = numpy_helper.to_array(inits[conv.input[1]])
    new_w = numpy_helper.from_array((w * sign.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype), f"{conv.name}_signed_W")
    graph.initializer.append(new_w)
    inits[new_w.name] = new_w
    conv.input[1] = new_w.name
    if len(conv.input) > 2 and conv.input[2]:
        b = numpy_helper.to_array(inits[conv.input[2]])
        new_b = numpy_helper.from_array((b * sign).astype(b.dtype), f"{conv.name}_signed_B")
        graph.initializer.append(new_b)
        inits[new_b.name] = new_b
        conv.input[2] = new_b.name
    # each consumer multiplies input channel c by sign[c]
    for r in readers:
        w = numpy_helper.to_array(inits[r.input[1]]).copy()
        group = next((a.i for a in r.attribute if a.name == "group"), 1)
        cin_g, out_g = w.shape[1], w.shape[0] // group
        for c in np.nonzero(sign < 0)[0]:
            g = c // cin_g
            w[g * out_g:(g + 1) * out_g, c % cin_g] *= -1
        new_r = numpy_helper.from_array(w, f"{r.name}_sign_folded_W")
        graph.initializer.append(new_r)
        inits[new_r.name] = new_r
        r.input[1] = new_r.name
    return True


def _drop_nodes(graph: onnx.GraphProto, remove: set[int]) -> None:
    """Remove the nodes whose id() is in `remove`, keeping the others in order."""
    keep = [n for n in graph.node if id(n) not in remove]
    del graph.node[:]
    graph.node.extend(keep)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node reads any more."""
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _prelu_max_inputs(node: onnx.NodeProto, producers: dict, consumers: dict) -> list[onnx.NodeProto] | None:
    """The DequantizeLinear nodes feeding a PReLU-made Max/Min, each read by it alone; None for any other node."""
    if not node.name.endswith(PRELU_TAG) or node.op_type not in ("Max", "Min"):
        return None
    dqs = [producers.get(i) for i in node.input]
    if not all(d is not None and d.op_type == "DequantizeLinear" and len(consumers[d.output[0]]) == 1 for d in dqs):
        return None
    return dqs


def fuse_int8_max(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """In a QDQ model, run each PRelu-made Max/Min on the 8-bit tensors: DQ->Max->Q becomes Max on (u)int8.

    The two inputs and the output are given one shared scale/zero point covering the union of their calibrated
    ranges; with shared parameters quantisation is monotone, so the 8-bit Max equals the quantised float Max.
    Returns the model and how many nodes were fused.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers, producers = _consumers(graph), _producers(graph)
    remove: set[int] = set()
    fused = 0
    for node in graph.node:
        dqs = _prelu_max_inputs(node, producers, consumers)
        if dqs is None:
            continue
        qs = [producers.get(d.input[0]) for d in dqs]
        outs = consumers[node.output[0]]
        if not all(q is not None and q.op_type == "QuantizeLinear" for q in qs) or not outs \
                or any(o.op_type != "QuantizeLinear" for o in outs):
            continue
        out_dqs = [c for o in outs for c in consumers[o.output[0]]]
        if any(c.op_type != "DequantizeLinear" for c in out_dqs):
            continue
        group = [*qs, *outs]
        params = [_scale_zp(inits, q.input[1], q.input[2]) if len(q.input) >= 3 else None for q in group]
        if any(p is None for p in params) or len({p[1].dtype for p in params}) != 1:
            continue
        scale, zp, dtype = _shared_params(params)  # type: ignore[arg-type]
        s_name, z_name = f"{node.name}_shared_scale", f"{node.name}_shared_zero_point"
        graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        graph.initializer.append(numpy_helper.from_array(np.array(zp, dtype=dtype), z_name))
        # every Q/DQ touching the three tensors takes the shared parameters
        for n in [*qs, *dqs, *out_dqs]:
            n.input[1], n.input[2] = s_name, z_name
        node.input[0], node.input[1] = qs[0].output[0], qs[1].output[0]
        node.output[0] = outs[0].output[0] + "_int8max"
        for n in out_dqs:  # one 8-bit Max output now feeds every dequantiser the output Q nodes fed
            n.input[0] = node.output[0]
        remove.update({id(dqs[0]), id(dqs[1]), *(id(o) for o in outs)})
        fused += 1
    _drop_nodes(graph, remove)
    requantize_biases(model)
    _drop_unused_initializers(graph)
    # value_info for removed float tensors would now be stale
    names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    vi = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return model, fused


def copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, quantization: dict | None = None) -> None:
    """Copy `metadata_props` from src to dst; add the quantisation settings under the `facekd` JSON key."""
    props = {p.key: p.value for p in src.metadata_props}
    if quantization is not None:
        try:
            meta = json.loads(props.get("facekd", "{}"))
        except json.JSONDecodeError:
            meta = {}
        meta["quantization"] = quantization
        props["facekd"] = json.dumps(meta, sort_keys=True)
    del dst.metadata_props[:]
    for k, v in props.items():
        entry = dst.metadata_props.add()
        entry.key, entry.value = k, v


def requantize_biases(model: onnx.ModelProto) -> int:
    """Make each int32 conv bias use scale = input scale * weight scale again (after input scales changed).

    onnxruntime fuses DQ->Conv->Q into QLinearConv only when the bias scale matches; a stale scale silently
    leaves a float Conv. Returns how many biases were rewritten.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = _producers(graph)
    changed = 0
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        dq_x, dq_w, dq_b = (producers.get(i) for i in node.input[:3])
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in (dq_x, dq_w, dq_b)):
            continue
        try:
            x_scale = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float64)
            w_scale = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
            b_q = numpy_helper.to_array(inits[dq_b.input[0]])
            b_scale = numpy_helper.to_array(inits[dq_b.input[1]]).astype(np.float64)
        except KeyError:
            continue
        if b_q.dtype != np.int32 or x_scale.size != 1:
            continue
        want = (x_scale.reshape(()) * w_scale).astype(np.float32)
        if want.shape == b_scale.shape and np.allclose(want, b_scale, rtol=1e-6, atol=0):
            continue
        bias = b_q.astype(np.float64) * b_scale
        new_q = np.clip(np.round(bias / want.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        q_name, s_name = f"{dq_b.input[0]}_requant", f"{dq_b.input[1]}_requant"
        graph.initializer.extend([numpy_helper.from_array(new_q, q_name), numpy_helper.from_array(want, s_name)])
        dq_b.input[0], dq_b.input[1] = q_name, s_name
        if len(dq_b.input) > 2 and dq_b.input[2]:
            zp_name = f"{dq_b.input[2]}_requant"
            graph.initializer.append(numpy_helper.from_array(np.zeros(want.shape, np.int32), zp_name))
            dq_b.input[2] = zp_name
        changed += 1
    return changed


def share_twin_weights(model: onnx.ModelProto) -> int:
    """Let each PReLU twin conv reuse its original conv's int8 weights (and int32 bias) in a QDQ model.

    With per-channel symmetric scales, quantising a*W gives, in exact arithmetic, the int8 values of W with scales
    a*s (for a > 0); in float32 a value on a rounding boundary can land one step apart, so the twin takes the
    original's integers whenever every entry is within 1 LSB (a change of at most one quantisation step in those
    entries) and needs only its own scale vector: the int8 file does not grow by the rewrite. Layers with a slope
    <= 0 (different integers) keep their own copy. Returns how many weight tensors are now shared.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = _producers(graph)
    by_name = {n.name: n for n in graph.node}
    shared = 0
    for twin in graph.node:
        if twin.op_type != "Conv" or not twin.name.endswith("_prelu_scaled"):
            continue
        orig = by_name.get(twin.name[: -len("_prelu_scaled")])
        if orig is None:
            continue
        for slot, tol in ((1, 1), (2, 1)):
            if len(twin.input) <= slot or len(orig.input) <= slot:
                continue
            dq_t, dq_o = producers.get(twin.input[slot]), producers.get(orig.input[slot])
            if dq_t is None or dq_o is None or dq_t.op_type != "DequantizeLinear" or dq_o.op_type != "DequantizeLinear":
                continue
            if dq_t.input[0] not in inits or dq_o.input[0] not in inits:
                continue
            a, b = numpy_helper.to_array(inits[dq_t.input[0]]), numpy_helper.to_array(inits[dq_o.input[0]])
            if a.shape != b.shape or a.dtype != b.dtype:
                continue
            if np.abs(a.astype(np.int64) - b.astype(np.int64)).max(initial=0) <= tol:
                dq_t.input[0] = dq_o.input[0]
                shared += slot == 1
    drop_zero_points(model)
    _drop_unused_initializers(graph)
    return shared


def drop_zero_points(model: onnx.ModelProto) -> int:
    """Remove all-zero zero points of DequantizeLinear nodes on constant int8/int32 tensors (weights, biases).

    A missing zero point means zero in ONNX, so this is exact; per-channel int32 bias zero points are as large as
    the biases themselves. Returns how many inputs were dropped.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dropped = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits:
            continue
        zp = inits.get(node.input[2])
        if zp is None or zp.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.INT32):
            continue
        if np.any(numpy_helper.to_array(zp)):
            continue
        del node.input[2]
        dropped += 1
    _drop_unused_initializers(graph)
    return dropped


def compact_names(model: onnx.ModelProto) -> None:
    """Give every internal tensor a short name (graph inputs/outputs and node names stay).

    A QDQ graph spells each long tensor name several times over (Q/DQ outputs, scales, zero points); on a
    MobileFaceNet that is ~8% of the int8 file. Node names keep the layer names for profiles and --keep-float.
    """
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"t{len(names)}"
        return names[name]

    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = short(name)
        for i, name in enumerate(node.output):
            node.output[i] = short(name)
    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    del graph.value_info[:]  # stale names; onnxruntime infers shapes itself


def _scale_zp(inits, scale_name: str, zp_name: str) -> tuple[float, np.ndarray] | None:
    if scale_name not in inits or zp_name not in inits:
        return None
    scale = numpy_helper.to_array(inits[scale_name])
    zp = numpy_helper.to_array(inits[zp_name])
    return (float(scale.reshape(-1)[0]), zp) if scale.size == 1 and zp.size == 1 else None


def _shared_params(params: list[tuple[float, np.ndarray]]) -> tuple[float, int, np.dtype]:
    """One scale/zero point covering the union of the real ranges of several 8-bit quantisations."""
    dtype = params[0][1].dtype
    info = np.iinfo(dtype)
    lo = min(min((info.min - int(z.item())) * s for s, z in params), 0.0)
    hi = max(max((info.max - int(z.item())) * s for s, z in params), 0.0)
    scale = max((hi - lo) / (info.max - info.min), 1e-12)
    return scale, int(np.clip(round(info.min - lo / scale), info.min, info.max)), dtype


def fuse_int8_max_qoperator(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`fuse_int8_max` for QOperator models: QLinearConv -> DQ -> Max -> Q -> QLinearConv becomes an 8-bit Max.

    The two producing QLinearConvs get one shared output scale/zero point; consumers that read the Max output
    (QLinearConv, DequantizeLinear) take the new input scale and, for QLinearConv, a requantised int32 bias.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers, producers = _consumers(graph), _producers(graph)
    remove: set[int] = set()
    fused = 0
    for node in graph.node:
        dqs = _prelu_max_inputs(node, producers, consumers)
        if dqs is None:
            continue
        convs = [producers.get(d.input[0]) for d in dqs]
        if not all(c is not None and c.op_type == "QLinearConv" and len(consumers[c.output[0]]) == 1 for c in convs):
            continue
        found = _requantised_readers(node, consumers)
        if found is None:
            continue
        outs, q_names, readers = found
        params = [_scale_zp(inits, c.input[6], c.input[7]) for c in convs] + \
                 [_scale_zp(inits, o.input[1], o.input[2]) for o in outs]
        if any(p is None for p in params) or len({p[1].dtype for p in params}) != 1:
            continue
        scale, zp, dtype = _shared_params(params)  # type: ignore[arg-type]
        s_name, z_name = f"{node.name}_shared_scale", f"{node.name}_shared_zero_point"
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                                  numpy_helper.from_array(np.array(zp, dtype), z_name)])
        for c in convs:
            c.input[6], c.input[7] = s_name, z_name
        out_name = f"{node.output[0]}_int8max"
        node.input[0], node.input[1] = convs[0].output[0], convs[1].output[0]
        node.output[0] = out_name
        _repoint_readers(graph, inits, readers, q_names, out_name, s_name, z_name, scale)
        remove.update({id(dqs[0]), id(dqs[1]), *(id(o) for o in outs)})
        fused += 1
    _drop_nodes(graph, remove)
    # twins share the original's int8 weights and int32 bias when they are within 1 LSB of them everywhere (slopes
    # > 0: the same integers up to float32 rounding of a*W); a shared entry moves by at most one quantisation step
    by_name = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    for twin in graph.node:
        base = twin.name.removesuffix("_quant")
        if not base.endswith("_prelu_scaled"):
            continue
        base = base.removesuffix("_prelu_scaled")
        orig = by_name.get(base + "_quant") or by_name.get(base)
        if orig is None or orig.op_type != "QLinearConv" or twin.op_type != "QLinearConv":
            continue
        for slot in (3, 8):
            if len(twin.input) <= slot or twin.input[slot] not in inits or orig.input[slot] not in inits:
                continue
            a, b = numpy_helper.to_array(inits[twin.input[slot]]), numpy_helper.to_array(inits[orig.input[slot]])
            if a.shape == b.shape and a.dtype == b.dtype and np.abs(a.astype(np.int64) - b).max(initial=0) <= 1:
                twin.input[slot] = orig.input[slot]
    _drop_unused_initializers(graph)
    return model, fused


def share_zero_weight_zero_points(model: onnx.ModelProto) -> int:
    """Point every all-zero QLinearConv weight zero point at one scalar 0 (symmetric weights; exact).

    quantize_static writes one int8 zero array per conv (as long as its output channels); a scalar is valid for
    per-channel scales and onnxruntime gives bit-identical outputs. Returns how many convs were repointed.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    shared: dict[int, str] = {}
    count = 0
    for node in graph.node:
        if node.op_type != "QLinearConv" or len(node.input) < 6 or node.input[5] not in inits:
            continue
        zp = inits[node.input[5]]
        if zp.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or np.any(numpy_helper.to_array(zp)):
            continue
        if zp.data_type not in shared:
            name = f"weight_zero_point_{'s8' if zp.data_type == onnx.TensorProto.INT8 else 'u8'}"
            dtype = np.int8 if zp.data_type == onnx.TensorProto.INT8 else np.uint8
            graph.initializer.append(numpy_helper.from_array(np.array(0, dtype), name))
            shared[zp.data_type] = name
        node.input[5] = shared[zp.data_type]
        count += 1
    _drop_unused_initializers(graph)
    return count


def _requantised_readers(node: onnx.NodeProto, consumers: dict) -> tuple[list, set[str], list] | None:
    """(QuantizeLinear outputs of `node`, their tensor names, their 8-bit readers) when every reader is one whose
    (x, x_scale, x_zero_point) input triples can be repointed; else None."""
    outs = consumers[node.output[0]]
    if not outs or any(o.op_type != "QuantizeLinear" for o in outs):
        return None
    q_names = {o.output[0] for o in outs}
    readers = [c for o in outs for c in consumers[o.output[0]]]
    if any(r.op_type not in ("QLinearConv", "DequantizeLinear", "QLinearAdd", "QLinearMul") for r in readers):
        return None
    if any(r.op_type in ("QLinearConv", "DequantizeLinear") and r.input[0] not in q_names for r in readers):
        return None
    return outs, q_names, readers


def _repoint_readers(graph: onnx.GraphProto, inits: dict, readers: list[onnx.NodeProto], q_names: set[str],
                     out_name: str, s_name: str, z_name: str, scale: float) -> None:
    """Make 8-bit readers of the tensors `q_names` read `out_name` (scale s_name, zero point z_name) instead;
    a QLinearConv's int32 bias is requantised for its new input scale."""
    for r in readers:
        slots = (0,) if r.op_type in ("QLinearConv", "DequantizeLinear") else (0, 3)
        for i in slots:
            if r.input[i] not in q_names:
                continue
            old = _scale_zp(inits, r.input[i + 1], r.input[i + 2])
            r.input[i], r.input[i + 1], r.input[i + 2] = out_name, s_name, z_name
            if r.op_type == "QLinearConv" and len(r.input) > 8 and r.input[8] in inits and old is not None:
                bias = numpy_helper.to_array(inits[r.input[8]]).astype(np.float64)
                new_b = np.clip(np.round(bias * old[0] / scale), -2**31, 2**31 - 1).astype(np.int32)
                b_name = f"{r.name}_bias_requant"
                graph.initializer.append(numpy_helper.from_array(new_b, b_name))
                inits[b_name] = graph.initializer[-1]
                r.input[8] = b_name


def fuse_int8_mulmax(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """QOperator models of the "maxmul" PReLU form: run Max(x, a*x) on 8-bit tensors.

    quantize_static leaves QLinearConv -> {QLinearMul(x, a), DQ} -> Max (float) -> Q. Here the conv output x, the
    QLinearMul output a*x and the Max output get one shared scale/zero point (the union of their calibrated
    ranges), so Max runs on uint8 (exact: shared-parameter quantisation is monotone) and the PReLU costs one
    8-bit elementwise multiply and one 8-bit Max instead of a second convolution.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers, producers = _consumers(graph), _producers(graph)
    remove: set[int] = set()
    fused = 0
    for node in graph.node:
        if not node.name.endswith(MULMAX_TAG) or node.op_type not in ("Max", "Min"):
            continue
        dqs = [producers.get(i) for i in node.input[:2]]
        if not all(d is not None and d.op_type == "DequantizeLinear" and len(consumers[d.output[0]]) == 1
                   for d in dqs):
            continue
        srcs = [producers.get(d.input[0]) for d in dqs]
        mul = next((p for p in srcs if p is not None and p.op_type == "QLinearMul"), None)
        conv = next((p for p in srcs if p is not None and p.op_type == "QLinearConv"), None)
        if mul is None or conv is None or mul.input[0] != conv.output[0]:
            continue
        if {c.name for c in consumers[conv.output[0]]} != {mul.name, *(d.name for d in dqs if d.input[0] == conv.output[0])}:
            continue
        found = _requantised_readers(node, consumers)
        if found is None:
            continue
        outs, q_names, readers = found
        params = [_scale_zp(inits, conv.input[6], conv.input[7]), _scale_zp(inits, mul.input[6], mul.input[7])] + \
                 [_scale_zp(inits, o.input[1], o.input[2]) for o in outs]
        if any(p is None for p in params) or len({p[1].dtype for p in params}) != 1:
            continue
        scale, zp, dtype = _shared_params(params)  # type: ignore[arg-type]
        s_name, z_name = f"{node.name}_shared_scale", f"{node.name}_shared_zero_point"
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s_name),
                                  numpy_helper.from_array(np.array(zp, dtype), z_name)])
        conv.input[6], conv.input[7] = s_name, z_name
        mul.input[1], mul.input[2] = s_name, z_name
        mul.input[6], mul.input[7] = s_name, z_name
        out_name = f"{node.output[0]}_int8max"
        node.input[0], node.input[1] = conv.output[0], mul.output[0]
        node.output[0] = out_name
        _repoint_readers(graph, inits, readers, q_names, out_name, s_name, z_name, scale)
        remove.update({id(dqs[0]), id(dqs[1]), *(id(o) for o in outs)})
        fused += 1
    _drop_nodes(graph, remove)
    _drop_unused_initializers(graph)
    return model, fused
