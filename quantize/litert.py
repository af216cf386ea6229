"""LiteRT (TFLite) export, fp32 and int8, with PReLU rewritten in PyTorch so the int8 graph has no float islands.

    python -m quantize.litert runs/NAME/pruned/model.safetensors --calib synthfaces --out runs/NAME/litert

Needs the optional extra `pip install -e ".[litert]"` (litert-torch converts, ai-edge-litert runs). litert-torch
decomposes nn.PReLU into RELU/MUL/SUB, which its PT2E int8 path leaves in float (a DEQUANTIZE island per PReLU).
Here every conv -> BatchNorm -> PReLU is first rewritten, exactly for slopes a <= 1, as

    PReLU(y) = a*y + (1-a)*Relu(y),  y = conv(x; W, b)   ->   conv(x; a*W, a*b) + Relu(conv(x; (1-a)*W, (1-a)*b))

i.e. a conv, a conv+ReLU and an add: the patterns the PT2E quantizer quantises and XNNPACK runs in int8. Layers with
a slope > 1 keep nn.PReLU (reported). The fidelity report matches `quantize.ptq`'s: fp32-vs-int8 embedding cosine,
verification accuracy of both, file sizes, host latency through the LiteRT interpreter (interleaved, 1 thread),
the XNNPACK partitions of both graphs (`evaluate.arm.runner.delegate_partitions`) and, with the emulation prefix
(`--arm`, as `results.pipeline`'s), aarch64 instructions per inference of both on cortex-a53/a72/a76.

`--target a53|a72|a76|x86|host|auto` converts every fp32 form (FP32_CANDIDATES) and int8 form (INT8_CANDIDATES) and
keeps the cheapest on that core, through quantize.target's costs and pick_cheapest (as quantize.ptq --target).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evaluate.arm.runner import delegate_partitions, make_interpreter
from facekd.io import FacekdError, atomic_path, atomic_write_json, cli_main, provenance


def _require_litert():
    try:
        import litert_torch  # noqa: F401
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except ImportError as err:
        raise FacekdError(f"LiteRT export needs the optional extra: pip install -e \".[litert]\" ({err})") from None


def litert_missing() -> str | None:
    """Why LiteRT cannot run here (the optional extra is not installed), or None."""
    try:
        _require_litert()
    except FacekdError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------------------------- PReLU in PyTorch

def _twin_prelu(conv, bn, prelu):
    """The module computing PReLU(bn(conv(x))) as conv_a(x) + relu(conv_b(x)) (see module docstring)."""
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
    a = prelu.weight.detach().reshape(-1)
    a = a.expand(fused.out_channels) if a.numel() == 1 else a
    shape = (-1,) + (1,) * (fused.weight.dim() - 1)

    class TwinConvPReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.neg, self.pos = copy.deepcopy(fused), copy.deepcopy(fused)
            with torch.no_grad():
                self.neg.weight.mul_(a.reshape(shape))
                self.neg.bias.mul_(a)
                self.pos.weight.mul_((1 - a).reshape(shape))
                self.pos.bias.mul_(1 - a)

        def forward(self, x):
            return self.neg(x) + torch.relu(self.pos(x))

    return TwinConvPReLU()


def prelu_to_twin_conv(model) -> tuple[Any, dict[str, int]]:
    """A copy of `model` (eval) with every Sequential(Conv2d, BatchNorm2d, PReLU) whose slopes are <= 1 replaced by
    its exact twin-conv form; returns (model, {"rewritten": n, "kept": m})."""
    from torch import nn

    model = copy.deepcopy(model).eval()
    counts = {"rewritten": 0, "kept": 0}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            parts = list(child.children()) if isinstance(child, nn.Sequential) else []
            if [type(p) for p in parts] != [nn.Conv2d, nn.BatchNorm2d, nn.PReLU]:
                continue
            if bool((parts[2].weight > 1).any()):
                counts["kept"] += 1
                continue
            setattr(module, name, _twin_prelu(*parts))
            counts["rewritten"] += 1
    counts["kept"] += sum(isinstance(m, nn.PReLU) for m in model.modules()) - counts["kept"]
    return model, counts


def _per_prelu(model, wrap) -> tuple[Any, dict[str, int]]:
    """A copy of `model` (eval) with every nn.PReLU whose slopes are <= 1 replaced by `wrap(prelu)`."""
    from torch import nn

    model = copy.deepcopy(model).eval()
    counts = {"rewritten": 0, "kept": 0}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.PReLU):
                ok = bool((child.weight <= 1).all())
                counts["rewritten" if ok else "kept"] += 1
                if ok:
                    setattr(module, name, wrap(child))
    return model, counts


def _slopes(prelu):
    return prelu.weight.detach().reshape(1, -1, 1, 1).clone()


def prelu_to_maxmul(model) -> tuple[Any, dict[str, int]]:
    """A copy of `model` with every nn.PReLU whose slopes are <= 1 computing maximum(x, a*x) (bit-exact): one int8
    MUL and one int8 MAXIMUM in LiteRT, no second conv; XNNPACK does not take int8 MAXIMUM, so the graph splits
    into one partition per PReLU."""
    import torch
    from torch import nn

    class MaxMulPReLU(nn.Module):
        def __init__(self, prelu: nn.PReLU) -> None:
            super().__init__()
            self.register_buffer("a", _slopes(prelu))

        def forward(self, x):
            return torch.maximum(x, x * self.a)

    return _per_prelu(model, MaxMulPReLU)


def prelu_to_addrelu(model) -> tuple[Any, dict[str, int]]:
    """A copy of `model` with every nn.PReLU whose slopes are <= 1 computing x + relu((a-1)*x) (exact within one
    rounding: for x < 0 it is x + (a-1)x = a*x, for x >= 0 the relu is 0): a MUL with fused RELU and an ADD, both
    int8 in XNNPACK, so one partition and no second conv."""
    import torch
    from torch import nn

    class AddReluPReLU(nn.Module):
        def __init__(self, prelu: nn.PReLU) -> None:
            super().__init__()
            self.register_buffer("c", _slopes(prelu) - 1)

        def forward(self, x):
            return x + torch.relu(x * self.c)

    return _per_prelu(model, AddReluPReLU)


def rewrite_prelu(model, form: str) -> tuple[Any, dict[str, int]]:
    """`model` with its PReLUs in `form` (PRELU_FORMS); `prelu` leaves them to litert-torch (RELU/MUL/SUB)."""
    from torch import nn

    if form not in PRELU_FORMS:
        raise FacekdError(f"unknown LiteRT PReLU form {form!r}; known: {', '.join(PRELU_FORMS)}")
    if form == "prelu":
        return copy.deepcopy(model).eval(), {"rewritten": 0,
                                             "kept": sum(isinstance(m, nn.PReLU) for m in model.modules())}
    return PRELU_FORMS[form](model)


PRELU_FORMS = {"prelu": None, "twin": prelu_to_twin_conv, "maxmul": prelu_to_maxmul, "relu": prelu_to_addrelu}
FP32_CANDIDATES = ("prelu", "maxmul", "relu")   # twin doubles the conv work: never cheaper in float
INT8_CANDIDATES = ("twin", "maxmul", "relu")    # prelu leaves float islands (DEQUANTIZE per PReLU)


# ----------------------------------------------------------------------------------------------- export

def export_tflite(model, path: str | Path, *, calib: np.ndarray | None = None, input_size=(112, 112)) -> Path:
    """Convert `model` (eval, NCHW float input) to `.tflite`; int8 (PT2E static, per-channel symmetric weights,
    calibrated on the preprocessed float batch `calib`) when `calib` is given, else fp32."""
    _require_litert()
    import litert_torch
    import torch

    args = (torch.zeros(1, 3, *input_size),)
    model = model.eval()
    if calib is not None:
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig

        _AddQuantizer = _add_quantizer_class()
        from torchao.quantization.pt2e import quantize_pt2e

        quantizer = _AddQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
        graph = torch.export.export(model, args).module()
        graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for i in range(len(calib)):  # the exported graph has batch 1
                graph(torch.from_numpy(calib[i:i + 1]))
        graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
        edge = litert_torch.convert(graph, args, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    else:
        edge = litert_torch.convert(model, args)
    path = Path(path)
    with atomic_path(path) as tmp:
        edge.export(str(tmp))
    return path


def _add_quantizer_class():
    from litert_torch.quantize import pt2e_quantizer, pt2e_quantizer_utils as utils
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec
    import torch

    class AddQuantizer(pt2e_quantizer.PT2EQuantizer):
        """PT2EQuantizer that also quantises every tensor add, and maximum(x, x*a) with x, x*a and the result on
        one scale. Its own add/mul annotators find ops through `source_fn_stack`, which torch.export no longer
        records, so residual and twin-conv adds stayed float (a DEQUANTIZE/ADD/QUANTIZE island each)."""

        def annotate(self, model):
            model = super().annotate(model)
            act, out = utils.get_input_act_qspec(self.global_config), utils.get_output_act_qspec(self.global_config)
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target == torch.ops.aten.add.Tensor \
                        and "quantization_annotation" not in node.meta:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={a: act for a in node.args[:2] if isinstance(a, torch.fx.Node)},
                        output_qspec=out, _annotated=True)
                if node.op == "call_function" and node.target == torch.ops.aten.maximum.default:
                    x, mul = node.args
                    shared = SharedQuantizationSpec(x)
                    mul.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={x: act, mul.args[1]: act}, output_qspec=shared, _annotated=True)
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={x: act, mul: shared}, output_qspec=shared, _annotated=True)
            return model

    return AddQuantizer


XNNPACK_METHOD = ("LiteRT interpreter as applied by default (XNNPACK, 1 thread), after allocate_tensors: "
                  "partitions = DELEGATE nodes; an op is inside one when reached walking back from the DELEGATE "
                  "node's outputs to its inputs (evaluate.arm.runner.delegate_partitions)")


def op_histogram(path: str | Path) -> dict[str, int]:
    """TFLite builtin op -> count over the interpreter's node list after delegation: every original op plus one
    DELEGATE node per XNNPACK partition. DEQUANTIZE/QUANTIZE inside an int8 graph mark float islands."""
    counts: dict[str, int] = {}
    for op in make_interpreter(str(path))._get_ops_details():
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class TfliteEmbedder:
    """evaluate.embed's Embedder protocol for a `.tflite` face model (batch 1 per invoke)."""

    def __init__(self, path: str | Path, preprocessing: dict[str, Any], embedding_dim: int) -> None:
        self.path, self.preprocessing, self.embedding_dim = str(path), preprocessing, embedding_dim
        self._it = make_interpreter(str(path))
        self._in, self._out = self._it.get_input_details()[0], self._it.get_output_details()[0]

    def embed_float(self, x: np.ndarray) -> np.ndarray:
        """Embeddings of preprocessed float NCHW `x`; an int8 model's int8 input/output are (de)quantised here."""
        s_in, z_in = self._in["quantization"]
        s_out, z_out = self._out["quantization"]
        out = []
        for row in x:
            v = row[None].astype(np.float32)
            if self._in["dtype"] != np.float32:
                info = np.iinfo(self._in["dtype"])
                v = np.clip(np.round(v / s_in + z_in), info.min, info.max).astype(self._in["dtype"])
            self._it.set_tensor(self._in["index"], v)
            self._it.invoke()
            y = self._it.get_tensor(self._out["index"])[0]
            out.append((y.astype(np.float32) - z_out) * s_out if self._out["dtype"] != np.float32 else y.copy())
        return np.stack(out)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from quantize.calib import preprocess

        return self.embed_float(preprocess(images, self.preprocessing))


# ----------------------------------------------------------------------------------------------- forms per target

def fp32_candidates(model, x: np.ndarray, out_dir: str | Path, forms: Sequence[str] = FP32_CANDIDATES, *,
                    log=print) -> dict[str, Any]:
    """`model` converted to fp32 `.tflite` in every PReLU form into `out_dir`, each form checked against the PyTorch
    module on the preprocessed inputs `x` before conversion: {"paths", "max_abs_diff"} (as quantize.target's)."""
    import torch

    from quantize.target import check_exact

    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    paths, diffs = {}, {}
    for form in forms:
        rewritten = rewrite_prelu(model, form)[0]
        with torch.no_grad():
            diffs[form] = check_exact(form, rewritten(torch.from_numpy(x)).numpy(), ref)
        log(f"LiteRT fp32 form {form}: converting")
        paths[form] = export_tflite(rewritten, Path(out_dir) / f"{form}.tflite", input_size=tuple(model.input_size))
    return {"paths": paths, "max_abs_diff": diffs}


def int8_candidates(model, calib_x: np.ndarray, out_dir: str | Path, forms: Sequence[str] = INT8_CANDIDATES, *,
                    holdout: float = 0.25, log=print) -> dict[str, Any]:
    """`model` converted to int8 `.tflite` in every PReLU form into `out_dir`, calibrated on 1 - holdout of the
    preprocessed `calib_x`: {"paths", "cosine" (held-out fp32 PyTorch vs int8 mean), "held_out_images", "counts"}."""
    import torch

    from quantize.core import cosine_rows
    from quantize.target import split_holdout

    fit, hold = split_holdout(calib_x, holdout)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(hold)).numpy()
    paths, cos, counts = {}, {}, {}
    for form in forms:
        rewritten, counts[form] = rewrite_prelu(model, form)
        log(f"LiteRT int8 form {form}: quantising")
        paths[form] = export_tflite(rewritten, Path(out_dir) / f"{form}.tflite", calib=fit,
                                    input_size=tuple(model.input_size))
        got = TfliteEmbedder(paths[form], getattr(model, "preprocessing", {}), 0).embed_float(hold)
        cos[form] = float(cosine_rows(ref, got).mean())
    return {"paths": paths, "cosine": cos, "held_out_images": int(len(hold)), "counts": counts}


def best_fp32(model, dst: str | Path, x: np.ndarray, target: str, *, forms: Sequence[str] = FP32_CANDIDATES,
              runs: int = 100, log=print) -> dict[str, Any]:
    """Write to `dst` the fp32 `.tflite` of `model` in its cheapest exact PReLU form on `target` (quantize.target's
    costs). Returns {"form", "unit", "costs", "max_abs_diff"} (as quantize.target.best_fp32)."""
    from quantize.target import cost_unit, pick_cheapest

    with tempfile.TemporaryDirectory(prefix="facekd-litert-fp32-") as tmp:
        cand = fp32_candidates(model, x, tmp, forms, log=log)
        best, found = pick_cheapest(cand["paths"], dst, target, runs=runs, log=log, what="LiteRT fp32 PReLU forms")
    return {"form": best, "unit": cost_unit(target), "costs": found, "max_abs_diff": cand["max_abs_diff"]}


def best_int8(model, dst: str | Path, calib_x: np.ndarray, target: str, *, forms: Sequence[str] = INT8_CANDIDATES,
              holdout: float = 0.25, runs: int = 100, log=print) -> dict[str, Any]:
    """Write to `dst` the int8 `.tflite` of `model` in the cheapest PReLU form on `target` among those whose
    held-out cosine is within quantize.target.COSINE_SLACK of the best.
    Returns {"form", "unit", "costs", "held_out_cosine", "held_out_images", "prelu"}."""
    from quantize.target import cost_unit, pick_cheapest

    with tempfile.TemporaryDirectory(prefix="facekd-litert-int8-") as tmp:
        cand = int8_candidates(model, calib_x, tmp, forms, holdout=holdout, log=log)
        best, found = pick_cheapest(cand["paths"], dst, target, cosine=cand["cosine"], runs=runs, log=log,
                                    what="LiteRT int8 forms")
    return {"form": best, "unit": cost_unit(target), "costs": found, "held_out_cosine": cand["cosine"],
            "held_out_images": cand["held_out_images"], "prelu": {"form": best, **cand["counts"][best]}}


# ----------------------------------------------------------------------------------------------- CLI

@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize.litert", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="facekd checkpoint (.safetensors): conversion starts from the PyTorch module")
    p.add_argument("--arch", help="architecture for checkpoints without facekd metadata")
    p.add_argument("--calib", default="synthfaces", help="calibration images (as quantize.ptq; bnstats too)")
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--eval", default="synthfaces", help="verification set for the fidelity report ('none' skips)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per model, interleaved (0 skips)")
    p.add_argument("--prelu", default="twin", choices=INT8_CANDIDATES,
                   help="int8 PReLU form: twin (default: conv(a*W) + Relu(conv((1-a)*W)), one XNNPACK partition), "
                        "maxmul (maximum(x, a*x): no second conv, but int8 MAXIMUM runs outside XNNPACK) or relu "
                        "(x + Relu((a-1)*x): a MUL+RELU and an ADD, one partition)")
    p.add_argument("--target", default="none",
                   help="choose both forms for a core by their measured cost there (as quantize.ptq --target): "
                        "a53 | a72 | a76 (emulated aarch64 instructions; needs evaluate.latency --arm-setup), x86 | "
                        "host (host ms), auto (this machine), none (default: fp32 as exported, int8 in --prelu). "
                        f"fp32 forms tried: {', '.join(FP32_CANDIDATES)}; int8: {', '.join(INT8_CANDIDATES)} "
                        "(overrides --prelu); rows get target=T, run NAME-litert-T")
    p.add_argument("--out", help="output directory (default <model dir>/../litert)")
    p.add_argument("--run", help="run name for the results table (default from runs/NAME/...); rows get '-litert'")
    p.add_argument("--results", default="results/summary.csv", help="results table ('none' skips)")
    p.add_argument("--arm", choices=("auto", "on", "off"), default="auto",
                   help="count aarch64 instructions of both models under QEMU with the aarch64 LiteRT (auto: when "
                        "`python -m evaluate.latency --arm-setup` installed it; on: fail when it cannot)")
    p.add_argument("--notes", default="", help="text put first in the rows' notes (the pipeline's smoke note)")
    args = p.parse_args(argv)
    model_path = Path(args.model)
    if not model_path.is_file():
        raise FacekdError(f"model not found: {model_path}")
    if model_path.suffix.lower() == ".onnx":
        raise FacekdError("quantize.litert converts from PyTorch: pass the facekd checkpoint (.safetensors), "
                          "not the ONNX file")
    if args.num_calib < 1:
        raise FacekdError(f"--num-calib must be >= 1, got {args.num_calib}")
    from quantize.target import resolve_target

    target = None if args.target == "none" else resolve_target(args.target)
    _require_litert()
    from evaluate.arm.prefix import arm_enabled

    count_arm = arm_enabled(args.arm, "litert")
    vset = None
    if args.eval != "none":
        from facedata import open_verification_set
        vset = open_verification_set(args.eval)
    from facekd.models import count_macs, count_params, load_checkpoint
    from quantize.calib import preprocess
    from quantize.core import cosine_rows
    from quantize.ptq import _run_name, calibration_images

    out = Path(args.out) if args.out else model_path.parent.parent / "litert"
    out.mkdir(parents=True, exist_ok=True)
    torch_model = load_checkpoint(model_path, arch=args.arch).eval()
    pre = torch_model.preprocessing
    images = calibration_images(args.calib, args.num_calib, torch_model=torch_model)
    x = preprocess(images, pre)
    fp32, int8 = out / "model_fp32.tflite", out / "model_int8.tflite"
    t0 = time.perf_counter()
    chosen: dict[str, Any] = {}
    if target:  # every candidate form converted and costed on the target; the cheapest exact/close ones written
        chosen = {"name": target, "fp32": best_fp32(torch_model, fp32, x[:8], target, runs=max(args.runs, 20)),
                  "int8": best_int8(torch_model, int8, x, target, runs=max(args.runs, 20))}
        form, counts = chosen["int8"]["form"], chosen["int8"].pop("prelu")
    else:
        form = args.prelu
        export_tflite(torch_model, fp32, input_size=tuple(torch_model.input_size))
        rewritten, counts = rewrite_prelu(torch_model, form)
        export_tflite(rewritten, int8, calib=x, input_size=tuple(torch_model.input_size))
    print(f"converted {model_path.name} -> {fp32.name}, {int8.name} in {time.perf_counter() - t0:.0f} s "
          f"(int8 PReLU as {form}: {counts['rewritten']}, kept: {counts['kept']}"
          + (f"; fp32 PReLU as {chosen['fp32']['form']}; chosen for {target}" if target else "") + ")")
    import torch

    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x[:8])).numpy()
    dim = torch_model.embedding_dim
    emb = {k: TfliteEmbedder(path, pre, dim) for k, path in (("fp32", fp32), ("int8", int8))}
    parity = float(np.abs(emb["fp32"].embed_float(x[:8]) - ref).max())
    report: dict[str, Any] = {
        "fp32": str(fp32), "int8": str(int8), "runtime": "litert", "prelu": {"form": form, **counts}, "fp32_parity_max_abs": parity,
        "ops": {"fp32": op_histogram(fp32), "int8": op_histogram(int8)},
        "file_bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}, "provenance": provenance(),
        **({"target": chosen} if target else {})}
    report["float_islands"] = sum(report["ops"]["int8"].get(k, 0) for k in ("DEQUANTIZE", "QUANTIZE"))
    report["xnnpack"] = {k: delegate_partitions(e._it) for k, e in emb.items()}
    report["xnnpack"]["method"] = XNNPACK_METHOD
    if vset is not None:
        from evaluate.embed import embed_set
        from evaluate.metrics import verification_metrics

        vecs = {k: embed_set(e, vset, flip=True) for k, e in emb.items()}
        metrics = {k: {m: v for m, v in verification_metrics(vecs[k], vset.issame,
                                                              nfolds=getattr(vset, "nfolds", 10)).items()
                       if m != "roc"} for k in vecs}
        cos = cosine_rows(vecs["fp32"], vecs["int8"])
        report.update({"dataset": vset.name, "pairs": int(len(vset.issame)), "metrics": metrics,
                       "cosine": {"mean": float(cos.mean()), "p1": float(np.percentile(cos, 1)),
                                  "min": float(cos.min())},
                       "accuracy_drop_points": 100 * (metrics["fp32"]["accuracy"] - metrics["int8"]["accuracy"])})
    if args.runs > 0:
        from evaluate.latency import measure_latency, system_info

        f_ms, i_ms = (r["median_ms"] for r in measure_latency([fp32, int8], runs=args.runs))
        report["latency"] = {"fp32_ms": f_ms, "int8_ms": i_ms, "int8_over_fp32": i_ms / f_ms, "host": system_info(),
                             "settings": f"LiteRT interpreter (XNNPACK), batch 1, 1 thread, 10 warm-up, {args.runs} "
                                         "runs each interleaved, median"}
    if count_arm:
        from evaluate.latency import ARM_CPUS, arm_instructions

        report["arm_instructions"] = {k: arm_instructions(path, ARM_CPUS) for k, path in (("fp32", fp32),
                                                                                         ("int8", int8))}
    atomic_write_json(out / "fidelity.json", report)
    print(format_report(report))
    if vset is not None and args.results != "none":
        from facekd import table

        lat, host = report.get("latency") or {}, (report.get("latency") or {}).get("host") or {}
        cpu = f"{host.get('cpu', '')} x{host.get('cores', '')} {host.get('arch', '')}".strip() if host else None
        run = f"{args.run or _run_name(model_path)}-litert" + (f"-{target}" if target else "")
        from evaluate.latency import table_values

        common = dict(params=count_params(torch_model), macs=count_macs(torch_model), embedding_dim=dim,
                      host_cpu=cpu, runtime="litert", hardware="cpu (conversion, no training)", target=target)
        arm = report.get("arm_instructions") or {}
        if not arm and chosen and chosen["fp32"]["unit"] == "instructions":  # the target's own count, measured
            arm = {k: {f"cortex-{target}": int(chosen[k]["costs"][chosen[k]["form"]])} for k in ("fp32", "int8")}

        def cells(k: str) -> dict[str, Any]:
            x = report["xnnpack"][k]
            note = f"LiteRT XNNPACK: {x['partitions']} partition(s), {x['ops_outside']} op(s) outside"
            return {"notes": "; ".join(n for n in (args.notes, note) if n), **table_values(arm=arm.get(k))}

        stage = "pruned" if "pruned" in model_path.resolve().parts else "student"
        rows = [table.model_row(stage, getattr(torch_model, "arch", "model"), run, dataset=vset.name,
                                metrics=report["metrics"]["fp32"], file_bytes=report["file_bytes"]["fp32"],
                                host_latency_ms=lat.get("fp32_ms"), artifact=str(fp32), **common, **cells("fp32")),
                table.model_row("int8", getattr(torch_model, "arch", "model"), run, dataset=vset.name,
                                metrics=report["metrics"]["int8"], file_bytes=report["file_bytes"]["int8"],
                                host_latency_ms=lat.get("int8_ms"), artifact=str(int8), **common, **cells("int8"))]
        table.upsert_rows(rows, args.results)
        print(f"results: 2 rows -> {args.results}")
    return 0


def format_report(r: dict[str, Any]) -> str:
    lines = [f"LiteRT: fp32 parity with PyTorch {r['fp32_parity_max_abs']:.1e}; int8 ops "
             + ", ".join(f"{k} {v}" for k, v in r["ops"]["int8"].items())
             + f" ({r['float_islands']} QUANTIZE/DEQUANTIZE)",
             "  XNNPACK: " + "; ".join(f"{k} {x['partitions']} partition(s), {x['ops_outside']} of {x['ops']} ops "
                                       f"outside {x['outside'] or ''}".rstrip() for k, x in r["xnnpack"].items()
                                       if k != "method"),
             f"  file: fp32 {r['file_bytes']['fp32'] / 1e6:.3f} MB  int8 {r['file_bytes']['int8'] / 1e6:.3f} MB"]
    if "cosine" in r:
        m = r["metrics"]
        lines.append(f"  {r['dataset']}: cosine fp32 vs int8 mean {r['cosine']['mean']:.5f} p1 {r['cosine']['p1']:.5f}"
                     f"; accuracy fp32 {m['fp32']['accuracy']:.4f} int8 {m['int8']['accuracy']:.4f}")
    if "latency" in r:
        lat = r["latency"]
        lines.append(f"  latency: fp32 {lat['fp32_ms']:.2f} ms  int8 {lat['int8_ms']:.2f} ms "
                     f"(int8/fp32 {lat['int8_over_fp32']:.2f}) [{lat['settings']}; {lat['host'].get('cpu', '')}]")
    if "target" in r:
        t = r["target"]
        from quantize.target import fmt_cost

        lines.append(f"  forms chosen for {t['name']}: " + "; ".join(
            f"{k} " + ", ".join(f"{f} {fmt_cost(c, t['name'])}" for f, c in t[k]["costs"].items())
            + f" -> {t[k]['form']}" for k in ("fp32", "int8")))
    if "arm_instructions" in r:
        arm = r["arm_instructions"]
        lines.append("  aarch64 instructions per inference (QEMU, LiteRT, 1 thread; not time): " + "; ".join(
            f"{cpu.removeprefix('cortex-')} fp32 {arm['fp32'][cpu] / 1e6:.1f}M int8 {arm['int8'][cpu] / 1e6:.1f}M"
            for cpu in arm["fp32"]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
