"""Latency measured on a real device: copy the model and a small runner there, time it there, read back JSON.

    python -m evaluate.latency MODEL.onnx --device ssh://user@host[:port]     # a Raspberry Pi, a Jetson, a board
    python -m evaluate.latency MODEL.tflite --device adb:SERIAL               # an Android device with python3

The device needs `python3` with numpy and onnxruntime (for `.onnx`) or LiteRT (`ai_edge_litert`, or the older
`tflite_runtime`, for `.tflite`); the runner (`RUNNER` below, stdlib + those) is copied next to the model into a
fresh temporary directory, which is removed afterwards. Only ssh/adb themselves are needed on this side: files go
over `ssh host 'cat > FILE'` (no scp/sftp) or `adb push`. `$FACEKD_SSH_CONFIG` names an ssh config file (`-F`) for
keys, known hosts and ports; `$FACEKD_REMOTE_PYTHON` the Python to run there (default `python3`).

The device is labelled from what it reports (`uname -m`, /proc/cpuinfo), never from what the caller assumes:
`arm_latency_ms` / `arm_device` are filled only when the device says it is aarch64/arm64; any other device's
median is returned as `device_latency_ms` with its real architecture in `device`.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from facekd.io import FacekdError

ARM_MACHINES = ("aarch64", "arm64", "armv8l", "armv7l")
# /proc/cpuinfo "CPU part" -> core name (evaluate.latency decodes the host's with it too)
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd40": "Neoverse-V1",
             "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710"}
# the runner: runs on the device, imports only the standard library, numpy and the runtime the model needs
RUNNER = r'''
import json, os, platform, statistics, sys, time
import numpy as np

def cpuinfo():
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            fields.setdefault(k.strip().lower(), v.strip())
    except OSError:
        pass
    return {k: fields.get(k, "") for k in ("model name", "hardware", "cpu implementer", "cpu part")}

def run(path, runs, warmup, threads):
    rng = np.random.default_rng(0)
    if path.endswith(".tflite"):
        try:
            from ai_edge_litert.interpreter import Interpreter
            runtime = "litert"
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
            runtime = "tflite_runtime"
        it = Interpreter(model_path=path, num_threads=threads)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        shape = [1 if s < 1 else int(s) for s in d["shape"]]
        x = rng.standard_normal(shape).astype(d["dtype"]) if np.issubdtype(d["dtype"], np.floating) \
            else rng.integers(0, 10, shape).astype(d["dtype"])
        def once():
            it.set_tensor(d["index"], x)
            it.invoke()
        import importlib.metadata as md
        try:
            version = md.version("ai-edge-litert" if runtime == "litert" else "tflite-runtime")
        except Exception:
            version = ""
    else:
        import onnxruntime as ort
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
        s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        i = s.get_inputs()[0]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feed = {i.name: rng.standard_normal(shape).astype(np.float32)}
        def once():
            s.run(None, feed)
        runtime, version = "onnxruntime", ort.__version__
    for _ in range(warmup):
        once()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        once()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "runs": runs, "warmup": warmup, "threads": threads, "runtime": runtime, "runtime_version": version}

out = {"machine": platform.machine(), "cores": os.cpu_count(), "cpuinfo": cpuinfo(), "models": {}}
runs, warmup, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for path in sys.argv[4:]:
    out["models"][os.path.basename(path)] = run(path, runs, warmup, threads)
print("FACEKD-REMOTE " + json.dumps(out))
'''


@dataclass
class Device:
    """Where to run: `ssh://user@host[:port]` or `adb:SERIAL`."""
    kind: str
    target: str  # user@host for ssh, the serial for adb
    port: int | None = None

    @property
    def spec(self) -> str:
        if self.kind == "adb":
            return f"adb:{self.target}"
        return f"ssh://{self.target}" + (f":{self.port}" if self.port else "")

    def _ssh(self) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes"]
        if os.environ.get("FACEKD_SSH_CONFIG"):
            cmd += ["-F", os.environ["FACEKD_SSH_CONFIG"]]
        return cmd + (["-p", str(self.port)] if self.port else []) + [self.target]

    def shell(self, command: str, *, stdin: bytes | None = None, timeout: float = 600) -> str:
        """Run a POSIX shell command on the device; its stdout, or FacekdError with its stderr."""
        argv = self._ssh() + [command] if self.kind == "ssh" else ["adb", "-s", self.target, "shell", command]
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
        except FileNotFoundError:
            raise FacekdError(f"{argv[0]} is not installed on this machine (needed for --device {self.spec})") from None
        except subprocess.TimeoutExpired:
            raise FacekdError(f"{self.spec}: {command.split()[0]} did not finish in {timeout:.0f} s") from None
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise FacekdError(f"{self.spec}: `{command[:60]}` failed (exit {done.returncode}): "
                              f"{err[-1] if err else 'no message'}")
        return done.stdout.decode(errors="replace")

    def push(self, local: Path, remote: str) -> None:
        if self.kind == "adb":
            done = subprocess.run(["adb", "-s", self.target, "push", str(local), remote], capture_output=True)
            if done.returncode != 0:
                raise FacekdError(f"{self.spec}: adb push {local.name} failed: {done.stderr.decode().strip()}")
            return
        self.shell(f"cat > {shlex.quote(remote)}", stdin=local.read_bytes())


def parse_device(spec: str) -> Device:
    """`ssh://user@host[:port]` or `adb:SERIAL` -> Device; anything else is a FacekdError."""
    if spec.startswith("adb:") and len(spec) > 4:
        return Device("adb", spec[4:])
    if spec.startswith("ssh://"):
        rest = spec[len("ssh://"):]
        port = None
        if rest.count(":") == 1:
            rest, _, p = rest.partition(":")
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise FacekdError(f"--device {spec}: port must be a number in 1..65535")
            port = int(p)
        if rest and "/" not in rest and ":" not in rest:
            return Device("ssh", rest, port)
    raise FacekdError(f"--device {spec!r}: expected ssh://user@host[:port] or adb:SERIAL")


def device_label(report: dict[str, Any], spec: str) -> str:
    """What the device is, from its own report: CPU model (or decoded ARM part), cores, architecture."""
    info, machine = report.get("cpuinfo") or {}, report.get("machine") or "unknown"
    cpu = info.get("model name") or ""
    if not cpu and info.get("cpu part"):
        part = info["cpu part"].lower()
        cpu = ARM_PARTS.get(part, f"ARM CPU part {part}")
    if info.get("hardware"):
        cpu = f"{cpu} ({info['hardware']})" if cpu else info["hardware"]
    return f"{cpu or 'unknown CPU'} x{report.get('cores', '?')} {machine} via {spec}"


def measure_remote(models: Sequence[str | os.PathLike], device: str, *, runs: int = 100, warmup: int = 10,
                   threads: int = 1) -> list[dict[str, Any]]:
    """Copy `models` and the runner to `device`, time each there (batch 1, `threads` threads), clean up.

    One record per model: median_ms, p90_ms, runtime (+ version), device (label), machine, and arm_latency_ms /
    arm_device, which are the median / label only when the device reports an ARM architecture, else None.
    """
    if runs < 1 or warmup < 0:
        raise FacekdError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})")
    paths = [Path(m) for m in models]
    for p in paths:
        if not p.is_file():
            raise FacekdError(f"model not found: {p}")
        if p.suffix.lower() not in (".onnx", ".tflite"):
            raise FacekdError(f"{p}: --device runs .onnx (onnxruntime) or .tflite (LiteRT) models")
    if len({p.name for p in paths}) != len(paths):
        raise FacekdError("--device: models need distinct file names (they share one directory there)")
    dev = parse_device(device)
    base = "/data/local/tmp" if dev.kind == "adb" else "${TMPDIR:-/tmp}"
    work = dev.shell(f"mktemp -d {base}/facekd-XXXXXX").strip()
    if not work.startswith("/"):
        raise FacekdError(f"{dev.spec}: could not make a temporary directory (got {work!r})")
    try:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="facekd-remote-") as tmp:
            runner = Path(tmp) / "runner.py"
            runner.write_text(RUNNER)
            dev.push(runner, f"{work}/runner.py")
        for p in paths:
            dev.push(p, f"{work}/{p.name}")
        args = " ".join(shlex.quote(f"{work}/{p.name}") for p in paths)
        python = os.environ.get("FACEKD_REMOTE_PYTHON", "python3")
        out = dev.shell(f"cd {shlex.quote(work)} && {python} runner.py {runs} {warmup} {threads} {args}")
    finally:
        try:
            dev.shell(f"rm -rf {shlex.quote(work)}", timeout=60)
        except FacekdError:
            pass
    line = next((ln for ln in out.splitlines() if ln.startswith("FACEKD-REMOTE ")), None)
    if line is None:
        raise FacekdError(f"{dev.spec}: the runner printed no result (last output: {out.strip()[-200:]!r})")
    rows = records(json.loads(line[len("FACEKD-REMOTE "):]), paths, dev.spec)
    for row in rows:
        row["remote_dir"] = work
    return rows


def records(report: dict[str, Any], paths: Sequence[Path], spec: str) -> list[dict[str, Any]]:
    """One record per model from the runner's report; ARM columns only when the device reports an ARM machine."""
    label = device_label(report, spec)
    on_arm = str(report.get("machine", "")).lower() in ARM_MACHINES
    return [{"model": str(p), **report["models"][p.name], "device": label, "machine": report.get("machine"),
             "arm_latency_ms": report["models"][p.name]["median_ms"] if on_arm else None,
             "arm_device": label if on_arm else None} for p in paths]


def table_values(record: dict[str, Any]) -> dict[str, Any]:
    """Results-table columns from one measure_remote record: only ARM devices fill the arm_ columns."""
    if record["arm_latency_ms"] is None:
        return {}
    return {"arm_latency_ms": round(record["arm_latency_ms"], 4), "arm_device": record["arm_device"]}


def run_cli(models: Sequence[str], device: str, *, threads: Sequence[int] = (1,), runs: int = 100,
            warmup: int = 10, table: str | None = None, as_json: bool = False) -> int:
    """`python -m evaluate.latency MODEL ... --device SPEC`: measure, print, optionally fill the results table."""
    parse_device(device)  # a bad spec fails before any copying
    if len(threads) != 1:
        raise FacekdError("--device measures one thread count at a time; give one --threads value")
    rows = measure_remote(models, device, runs=runs, warmup=warmup, threads=threads[0])
    if table:
        from facekd.table import update_columns

        for spec, row in zip(models, rows):
            values = table_values(row)
            hits = update_columns({"artifact": spec}, values, table) if values else 0
            print(f"{table}: updated {hits} row(s) whose artifact is {spec}"
                  + ("" if values else f" (the device is {row['machine']}, not ARM: arm_ columns left empty)"))
    if as_json:
        print(json.dumps({"device": rows}, indent=2))
    else:
        print(f"device: {rows[0]['device']}; batch 1, {threads[0]} thread(s), {runs} runs after {warmup} warm-up")
        for r in rows:
            print(f"{Path(r['model']).name:32s} {r['runtime']:12s} median {r['median_ms']:9.3f} ms  "
                  f"p90 {r['p90_ms']:9.3f} ms")
    return 0
