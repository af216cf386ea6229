"""Run one ONNX model and mark each inference for the instruction-counting QEMU plugin (`insncount.c`).

This file runs in two places, so it imports only numpy and onnxruntime:
- inside the emulated aarch64 Python (`qemu-aarch64 ... python3 runner.py MODEL`), started by
  `evaluate.latency.arm_instructions`;
- on the host, where `evaluate.latency` imports `make_session` and `make_inputs` so host latency and emulated
  counts run the same session settings on the same input.

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

import numpy as np
import onnxruntime as ort

MARK_START = 0x464B0001  # must match insncount.c
MARK_STOP = 0x464B0002

_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
}


def mark(code: int) -> None:
    try:
        os.sched_get_priority_max(code)
    except OSError:  # EINVAL is the expected answer: the call is only a signal to the plugin
        pass


def make_session(path: str, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, one inter-op thread, sequential execution."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def make_inputs(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
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
                raise ValueError(f"input {arg.name!r} has symbolic dimension {d} ({size!r}); only the batch may be")
        dtype = _DTYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has unsupported type {arg.type}")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run MODEL with marked inferences for the insncount QEMU plugin.")
    parser.add_argument("model")
    parser.add_argument("--warmup", type=int, default=3, help="unmarked runs first (lazy allocations, caches)")
    parser.add_argument("--runs", type=int, default=5, help="marked runs, one count each")
    args = parser.parse_args(argv)
    session = make_session(args.model, threads=1)
    feeds = make_inputs(session)
    for _ in range(args.warmup):
        session.run(None, feeds)
    # A garbage collection inside a marked window would add a few 100k instructions to one run only.
    gc.collect()
    gc.disable()
    mark(MARK_START)
    mark(MARK_STOP)
    for _ in range(args.runs):
        mark(MARK_START)
        session.run(None, feeds)
        mark(MARK_STOP)
    print(json.dumps({"onnxruntime": ort.__version__, "machine": platform.machine(), "python": sys.version.split()[0],
                      "numpy": np.__version__, "runs": args.runs, "warmup": args.warmup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
