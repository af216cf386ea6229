"""Emulated ARM cost: one inference of an ONNX (onnxruntime) or `.tflite` (LiteRT) model counted in aarch64
instructions under QEMU user-mode emulation.

The host side of `runner.py`: it starts the prefix's aarch64 Python under `qemu-aarch64 -cpu CPU` with the
counting plugin (`insncount.c`), runs `runner.py MODEL` there, and turns the plugin's per-window counts into one
record, cached in the prefix per (model sha256, cpu, runtime and its version, runner and plugin source).
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from evaluate.arm.prefix import ARM_CPUS, ARM_DIR, PLUGIN_SOURCE, _build_plugin, _guest_python, _qemu, \
    arm_toolchain_status, default_prefix, runtime_of
from facekd.io import FacekdError, atomic_write_json, sha256_file

RUNNER = ARM_DIR / "runner.py"
_EMULATION_TIMEOUT_S = 1800


def check_model(path: str | os.PathLike) -> Path:
    """`path` when it is an ONNX or `.tflite` file (what host timing and emulation run), else a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"model not found: {path}")
    if path.suffix.lower() not in (".onnx", ".tflite"):
        raise FacekdError(f"{path}: latency is measured on ONNX (onnxruntime) or .tflite (LiteRT) files; export "
                          "the model first (facekd.models.export_onnx, quantize.litert)")
    return path


def _source_hash() -> str:
    h = hashlib.sha256(PLUGIN_SOURCE.read_bytes() + RUNNER.read_bytes())
    return h.hexdigest()[:12]


def cache_path(prefix: Path, digest: str, cpu: str, runtime: str, version: str, warmup: int, runs: int) -> Path:
    """The prefix's cache entry of one count: model sha256, core, runtime + version, runner/plugin source, method."""
    tag = {"onnxruntime": "ort"}.get(runtime, runtime)  # "ort": the key ONNX entries had before LiteRT existed
    return prefix / "cache" / f"{digest[:16]}-{cpu}-{tag}{version}-{_source_hash()}-w{warmup}r{runs}.json"


def arm_instruction_record(path: str | os.PathLike, cpu: str, *, prefix: str | os.PathLike | None = None,
                           warmup: int = 3, runs: int = 5, use_cache: bool = True) -> dict[str, Any]:
    """Count the aarch64 instructions of one inference of `path` on `cpu`; the full record (cached in the prefix).

    `instructions` is the median over `runs` marked inferences after `warmup` unmarked ones, minus the cost of an
    empty marked window (the markers themselves); `runs_instructions` holds every run's count, `spread` their
    (max - min) / median, `outlier_runs` how many exceed the median by over 0.1% (about one run per process
    carries a ~0.4M-instruction extra at a time-dependent position; the median drops it).
    """
    model = check_model(path)
    if cpu not in ARM_CPUS:
        raise FacekdError(f"--arm-cpus: unknown CPU {cpu!r}; choose from: {', '.join(ARM_CPUS)}")
    prefix = Path(prefix).expanduser() if prefix else default_prefix()
    runtime = runtime_of(model)
    ok, reason = arm_toolchain_status(prefix, runtime=runtime)
    if not ok:
        raise FacekdError(reason)
    setup = json.loads((prefix / "setup.json").read_text())
    digest = sha256_file(model)
    cache = cache_path(prefix, digest, cpu, runtime, setup[runtime], warmup, runs)
    if use_cache and cache.is_file():
        try:
            record = json.loads(cache.read_text())
            return {**record, "model": str(model), "cached": True}
        except json.JSONDecodeError:
            pass  # a damaged cache entry is recomputed
    plugin = _build_plugin(prefix)
    python = _guest_python(prefix)
    # A fixed hash seed makes the emulated process deterministic: two processes then count the same instructions
    # run for run, except for a rare ~0.4M-instruction extra in one run at a time-dependent position, which the
    # median over runs drops. The environment is built here, so nothing of the host's PYTHON* variables leaks in.
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "HOME": str(prefix), "PYTHONHASHSEED": "0", "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="facekd-insncount-") as tmp:
        counts_file = Path(tmp) / "counts.txt"
        cmd = [_qemu(), "-L", str(prefix / "cpu" / cpu), "-cpu", cpu, "-plugin", f"{plugin},out={counts_file}",
               str(python), "-s", str(RUNNER), str(model.resolve()), "--warmup", str(warmup), "--runs", str(runs)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=_EMULATION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FacekdError(f"emulated run of {model} on {cpu} took over {_EMULATION_TIMEOUT_S} s") from None
        wall = time.perf_counter() - start
        lines = counts_file.read_text().split() if counts_file.is_file() else []
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FacekdError(f"emulated run of {model} on {cpu} failed (exit {proc.returncode}): {last}")
    counts = [int(v) for v in lines[0::2]]  # lines are "<instructions> <vcpu>"
    if len(counts) != runs + 1:
        raise FacekdError(f"emulated run of {model} on {cpu}: expected {runs + 1} marked windows, got {len(counts)}")
    overhead, per_run = counts[0], [c - counts[0] for c in counts[1:]]
    guest = json.loads(proc.stdout.strip().splitlines()[-1])
    median = int(statistics.median(per_run))
    record = {
        "model": str(model), "sha256": digest, "cpu": cpu, "instructions": median, "unit": "instructions",
        "runs_instructions": per_run, "marker_overhead": overhead,
        "spread": (max(per_run) - min(per_run)) / median if median else 0.0,
        "outlier_runs": sum(c > median * 1.001 for c in per_run), "warmup": warmup, "runs": runs,
        "runtime": guest["runtime"], guest["runtime"]: guest["version"], "guest_python": guest["python"],
        "numpy": guest["numpy"], **({"xnnpack": guest["xnnpack"]} if "xnnpack" in guest else {}),
        "qemu": setup.get("qemu"), "emulation_wall_s": round(wall, 2), "cached": False,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(cache, record)
    return record


def arm_instructions(path: str | os.PathLike, cpus: Sequence[str] = ARM_CPUS, *,
                     prefix: str | os.PathLike | None = None, use_cache: bool = True) -> dict[str, int]:
    """aarch64 instructions per inference of an ONNX or `.tflite` model under QEMU, per `-cpu` model (1 thread).

    Raises FacekdError saying what is missing when the toolchain is not installed (see `arm_toolchain_status`).
    """
    return {cpu: arm_instruction_record(path, cpu, prefix=prefix, use_cache=use_cache)["instructions"]
            for cpu in cpus}


