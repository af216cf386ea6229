"""Run one ONNX or LiteRT model and mark each inference for the instruction-counting QEMU plugin (`insncount.c`).

This file runs in two places, so it imports only numpy and the runtime of the model (onnxruntime for `.onnx`,
ai_edge_litert for `.tflite`, imported when first needed):
- inside the emulated aarch64 Python (`qemu-aarch64 ... python3 runner.py MODEL`), started by
  `evaluate.arm.emulate.arm_instruction_record`;
- on the host, where `evaluate.latency` imports `open_model` so host latency and emulated counts run the same
  session settings on the same input.

Each measured inference sits between two `sched_get_priority_max` calls with invalid policies (the markers): the
kernel answers EINVAL, the plugin records its instruction counter. An empty marked window is measured first, so
the caller can subtract the cost of the markers themselves.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from typing import Any, Callable

import numpy as np

MARK_START = 0x464B0001  # must match insncount.c
MARK_STOP = 0x464B0002

_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}


class InputError(ValueError):
    """A model input that `make_inputs` cannot fill (a symbolic dimension other than the batch, an unknown type)."""


def mark(code: int) -> None:
    try:
        os.sched_get_priority_max(code)
    except OSError:  # EINVAL is the expected answer: the call is only a signal to the plugin
        pass


def make_session(path: str, threads: int = 1) -> Any:
    """An onnxruntime CPU session with `threads` intra-op threads, one inter-op thread, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def make_inputs(session: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch-1 inputs from the model's declared shapes: standard normal floats (integers 0..9), fixed seed.

    The first dimension is the batch (1 when symbolic); any other symbolic dimension is an error, since the
    model alone cannot say how large it should be.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for i, arg in enumerate(session.get_inputs()):
        shape = []
        for d, size in enumerate(arg.shape):
            if isinstance(size, int) and size > 0:
                shape.append(size)
            elif d == 0:
                shape.append(1)
            else:
                raise InputError(f"input {arg.name!r} has symbolic dimension {d} ({size!r}); only the batch may be")
        dtype = _DTYPES.get(arg.type)
        if dtype is None:
            raise InputError(f"input {arg.name!r} has unsupported type {arg.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def make_interpreter(path: str, threads: int = 1) -> Any:
    """A LiteRT interpreter as an app gets it: default delegates (XNNPACK on CPU), `threads` threads, allocated."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def interpreter_inputs(interpreter: Any, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """(tensor index, value) per input: the same standard normal floats as `make_inputs`, quantised with the
    input's own scale and zero point where the model takes integers (an int8 `.tflite`)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for d in interpreter.get_input_details():
        x = rng.standard_normal([max(int(s), 1) for s in d["shape"]])
        if not np.issubdtype(d["dtype"], np.floating):
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / (scale or 1.0) + zero), info.min, info.max)
        feeds.append((d["index"], x.astype(d["dtype"])))
    return feeds


def delegate_partitions(interpreter: Any) -> dict[str, Any]:
    """How the delegates (XNNPACK) split an allocated interpreter's graph: {"partitions", "ops", "ops_outside",
    "outside": {op: count}}.

    LiteRT's node list keeps every original op after delegation and appends one DELEGATE node per partition; the
    Python API does not expose the execution plan. So an op is inside a partition when it is reached walking back
    from that DELEGATE node's output tensors without crossing its input tensors (a partition is a convex subgraph
    whose boundary tensors are exactly the DELEGATE node's inputs and outputs); every other original op runs
    outside the delegates.
    """
    ops = interpreter._get_ops_details()
    delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
    originals = [op for op in ops if op["op_name"] != "DELEGATE"]
    producer = {t: op["index"] for op in originals for t in op["outputs"]}
    by_index = {op["index"]: op for op in originals}
    inside: set[int] = set()
    for delegate in delegates:
        boundary, stack = set(delegate["inputs"]), list(delegate["outputs"])
        while stack:
            t = stack.pop()
            node = producer.get(t)
            if t in boundary or node is None or node in inside:
                continue
            inside.add(node)
            stack.extend(by_index[node]["inputs"])
    outside: dict[str, int] = {}
    for op in originals:
        if op["index"] not in inside:
            outside[op["op_name"]] = outside.get(op["op_name"], 0) + 1
    return {"partitions": len(delegates), "ops": len(originals), "ops_outside": len(originals) - len(inside),
            "outside": outside}


def open_model(path: str, threads: int = 1, seed: int = 0) -> tuple[Callable[[], Any], dict[str, Any]]:
    """(run, info): `run()` is one batch-1 inference of the `.onnx` (onnxruntime) or `.tflite` (LiteRT) model at
    `path` on fixed inputs (`make_inputs` / `interpreter_inputs`); info names the runtime and its version, plus
    the delegate partitions of a `.tflite`. Loading errors are the runtime's own; inputs it cannot fill raise InputError."""
    if path.lower().endswith(".tflite"):
        import ai_edge_litert

        interpreter = make_interpreter(path, threads)
        tensors = interpreter_inputs(interpreter, seed)

        def run() -> None:
            for index, value in tensors:
                interpreter.set_tensor(index, value)
            interpreter.invoke()

        return run, {"runtime": "litert", "version": ai_edge_litert.__version__,
                     "xnnpack": delegate_partitions(interpreter)}
    import onnxruntime as ort

    session = make_session(path, threads)
    feeds = make_inputs(session, seed)
    return (lambda: session.run(None, feeds)), {"runtime": "onnxruntime", "version": ort.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run MODEL (.onnx or .tflite) with marked inferences for the insncount QEMU plugin.")
    parser.add_argument("model")
    parser.add_argument("--warmup", type=int, default=3, help="unmarked runs first (lazy allocations, caches)")
    parser.add_argument("--runs", type=int, default=5, help="marked runs, one count each")
    args = parser.parse_args(argv)
    run, info = open_model(args.model, threads=1)
    for _ in range(args.warmup):
        run()
    # A garbage collection inside a marked window would add a few 100k instructions to one run only.
    gc.collect()
    gc.disable()
    mark(MARK_START)
    mark(MARK_STOP)
    for _ in range(args.runs):
        mark(MARK_START)
        run()
        mark(MARK_STOP)
    print(json.dumps({**info, "machine": platform.machine(), "python": sys.version.split()[0],
                      "numpy": np.__version__, "runs": args.runs, "warmup": args.warmup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
