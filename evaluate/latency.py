"""Host latency (onnxruntime CPU, milliseconds) and emulated ARM cost (aarch64 instructions under QEMU).

    python -m evaluate.latency A.onnx B.onnx --threads 1,4          # interleaved A/B rounds, ratios vs A
    python -m evaluate.latency A.onnx --json --arm-emulate           # + instructions per inference on 3 ARM cores
    python -m evaluate.latency --arm-setup                           # install the emulation toolchain once

Two different quantities, never mixed:
- latency in ms, measured with onnxruntime on this machine. On an aarch64 machine the same figures are the ARM
  latency columns (`arm_latency_ms`, `arm_device`); elsewhere those stay empty (None), never an estimate.
- emulated ARM cost: the number of aarch64 instructions one inference executes, counted under QEMU user-mode
  emulation (`-cpu cortex-a53 | cortex-a72 | cortex-a76`) by the project's TCG plugin `evaluate/arm/insncount.c`,
  with the model run by an aarch64 Python + onnxruntime unpacked into a prefix (`--arm-setup`). It is a count of
  instructions, deterministic to well under 0.1%; it is not a time (memory stalls, SIMD widths and clocks differ).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from evaluate.arm.runner import make_inputs, make_session
from facekd.io import FacekdError, atomic_write_json, cli_main, sha256_file

ARM_CPUS = ("cortex-a53", "cortex-a72", "cortex-a76")
ARM_DIR = Path(__file__).resolve().parent / "arm"
PLUGIN_SOURCE = ARM_DIR / "insncount.c"
RUNNER = ARM_DIR / "runner.py"
PLUGIN_HEADER = "qemu-plugin.h"

# /proc/cpuinfo served to the emulated process per -cpu model: onnxruntime's cpuinfo library crashes on the host's
# x86 file, and picks kernels by micro-architecture (CPU part) and features (asimddp = dot product on the A76).
_CPUINFO = {
    "cortex-a53": ("0x0", "0xd03", "4", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a72": ("0x0", "0xd08", "3", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a76": ("0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                   "asimdrdm lrcpc dcpop asimddp"),
}
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
              "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
              "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd40": "Neoverse-V1",
              "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710"}
# aarch64 Debian packages that make a Python able to import numpy and onnxruntime ({py} = 3.11 on bookworm).
_ARM_DEBS = ("python{py}-minimal", "libpython{py}-minimal", "libpython{py}-stdlib", "libc6", "zlib1g", "libexpat1",
             "libffi8", "libgcc-s1", "libstdc++6")
_EMULATION_TIMEOUT_S = 1800


def default_prefix() -> Path:
    """Where `--arm-setup` installs the emulation toolchain: $FACEKD_ARM_PREFIX, else ~/.cache/facekd/arm."""
    return Path(os.environ.get("FACEKD_ARM_PREFIX") or "~/.cache/facekd/arm").expanduser()


# ---------------------------------------------------------------------------------------------------------------
# host latency

def _cpuinfo_fields() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def system_info() -> dict[str, Any]:
    """Architecture, CPU model, core count and onnxruntime version of this machine."""
    import onnxruntime

    fields = _cpuinfo_fields()
    cpu = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    if not cpu and "CPU part" in fields:
        part = fields["CPU part"].lower()
        cpu = _ARM_PARTS.get(part, f"ARM CPU part {part}")
    arch = platform.machine()
    device = None
    if arch in ("aarch64", "arm64"):
        try:  # boards name themselves here (e.g. "Raspberry Pi 4 Model B Rev 1.4")
            device = Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
        except OSError:
            device = None
    return {"arch": arch, "cpu": cpu or platform.processor() or "unknown", "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "device": device}


def _check_model(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"model not found: {path}")
    if path.suffix.lower() != ".onnx":
        raise FacekdError(f"{path}: latency is measured on ONNX files; export the model first "
                          "(facekd.models.export_onnx)")
    return path


def _open_session(path: Path, threads: int) -> Any:
    try:
        return make_session(str(path), threads)
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        raise FacekdError(f"{path}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from None


def measure_latency(paths: Sequence[str | os.PathLike], threads: Sequence[int] = (1,), runs: int = 100,
                    warmup: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """onnxruntime CPU latency of each model at each intra-op thread count, batch 1, in milliseconds.

    Models are timed in interleaved rounds (A B A B ...) so drift in machine load hits them alike, which makes the
    ratios vs the first model fair. One dict per (model, threads), with every run's time in `times_ms`.
    On aarch64 `arm_latency_ms` / `arm_device` repeat the median / this CPU; elsewhere they are None.
    """
    if not paths:
        raise FacekdError("no model given")
    if runs < 1 or warmup < 0:
        raise FacekdError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})")
    if not threads or any(int(t) < 1 for t in threads):
        raise FacekdError(f"--threads: thread counts must be >= 1 (got {list(threads)})")
    models = [_check_model(p) for p in paths]
    info = system_info()
    on_arm = info["arch"] in ("aarch64", "arm64")
    results: list[dict[str, Any]] = []
    for n_threads in threads:
        sessions = [_open_session(p, int(n_threads)) for p in models]
        feeds = []
        for path, session in zip(models, sessions):
            try:
                feeds.append(make_inputs(session, seed))
            except ValueError as err:
                raise FacekdError(f"{path}: {err}") from None
        for _ in range(warmup):
            for session, feed in zip(sessions, feeds):
                session.run(None, feed)
        times = [[0.0] * runs for _ in models]
        for r in range(runs):
            for i, (session, feed) in enumerate(zip(sessions, feeds)):
                start = time.perf_counter_ns()
                session.run(None, feed)
                times[i][r] = (time.perf_counter_ns() - start) / 1e6
        first_median = None
        for path, t in zip(models, times):
            median = float(np.median(t))
            first_median = median if first_median is None else first_median
            results.append({
                "model": str(path), "name": path.stem, "sha256": sha256_file(path), "threads": int(n_threads),
                "runs": runs, "warmup": warmup, "median_ms": median, "p90_ms": float(np.percentile(t, 90)),
                "mean_ms": float(np.mean(t)), "min_ms": float(np.min(t)), "ratio_vs_first": median / first_median,
                "times_ms": t, "arch": info["arch"], "cpu": info["cpu"], "cores": info["cores"],
                "onnxruntime": info["onnxruntime"],
                "arm_latency_ms": median if on_arm else None,
                "arm_device": (info["device"] or info["cpu"]) if on_arm else None,
            })
    return results


# ---------------------------------------------------------------------------------------------------------------
# emulated ARM cost: toolchain layout inside the prefix
#   root/            aarch64 Debian packages + numpy/onnxruntime wheels (usr/lib/python3/dist-packages)
#   cpu/<name>/      per -cpu model: proc/cpuinfo + links to root/{lib,usr,etc}; given to qemu as -L
#   include/         qemu-plugin.h from the Debian qemu source package matching qemu-user
#   lib/             the compiled plugin, named by a hash of its source
#   cache/           one JSON per (model sha256, cpu, onnxruntime, runner+plugin source)
#   setup.json       what setup installed, written last

def _qemu() -> str | None:
    return shutil.which("qemu-aarch64")


def _source_hash() -> str:
    h = hashlib.sha256(PLUGIN_SOURCE.read_bytes() + RUNNER.read_bytes())
    return h.hexdigest()[:12]


def _guest_python(prefix: Path) -> Path | None:
    found = sorted((prefix / "root/usr/bin").glob("python3.*"))
    found = [p for p in found if re.fullmatch(r"python3\.\d+", p.name)]
    return found[-1] if found else None


def _plugin_path(prefix: Path) -> Path:
    return prefix / "lib" / f"libinsncount-{hashlib.sha256(PLUGIN_SOURCE.read_bytes()).hexdigest()[:12]}.so"


def _build_plugin(prefix: Path) -> Path:
    out = _plugin_path(prefix)
    if out.is_file():
        return out
    header = prefix / "include" / PLUGIN_HEADER
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not header.is_file():
        raise FacekdError(f"{header} is missing; run: python -m evaluate.latency --arm-setup --prefix {prefix}")
    if gcc is None:
        raise FacekdError("no C compiler (gcc) to build the QEMU plugin; install it: apt-get install -y gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.so")
    proc = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", f"-I{header.parent}", "-o", str(tmp),
                           str(PLUGIN_SOURCE)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FacekdError(f"building the QEMU plugin failed: {proc.stderr.strip().splitlines()[-1:]}")
    os.replace(tmp, out)
    return out


def arm_toolchain_status(prefix: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(True, summary) when instructions can be counted, else (False, what is missing and how to install it)."""
    prefix = Path(prefix).expanduser() if prefix else default_prefix()
    setup_hint = f"run: python -m evaluate.latency --arm-setup --prefix {prefix}"
    qemu = _qemu()
    if qemu is None:
        return False, f"qemu-aarch64 not found (Debian package qemu-user); {setup_hint}"
    stamp = prefix / "setup.json"
    if not stamp.is_file():
        return False, f"no emulation prefix at {prefix}; {setup_hint}"
    try:
        setup = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False, f"{stamp} is unreadable; {setup_hint}"
    if _guest_python(prefix) is None:
        return False, f"aarch64 Python missing under {prefix}/root; {setup_hint}"
    if not all((prefix / "cpu" / c / "proc/cpuinfo").is_file() for c in ARM_CPUS):
        return False, f"per-CPU overlays missing under {prefix}/cpu; {setup_hint}"
    if not _plugin_path(prefix).is_file():
        if not (prefix / "include" / PLUGIN_HEADER).is_file() or not (shutil.which("gcc") or shutil.which("cc")):
            return False, f"QEMU plugin not built and cannot be (needs gcc and {PLUGIN_HEADER}); {setup_hint}"
    return True, (f"qemu-aarch64 {setup.get('qemu', '?')}, aarch64 Python {setup.get('python', '?')}, "
                  f"onnxruntime {setup.get('onnxruntime', '?')} in {prefix}")


def arm_instruction_record(path: str | os.PathLike, cpu: str, *, prefix: str | os.PathLike | None = None,
                           warmup: int = 3, runs: int = 5, use_cache: bool = True) -> dict[str, Any]:
    """Count the aarch64 instructions of one inference of `path` on `cpu`; the full record (cached in the prefix).

    `instructions` is the median over `runs` marked inferences after `warmup` unmarked ones, minus the cost of an
    empty marked window (the markers themselves); `runs_instructions` holds every run's count, `spread` their
    (max - min) / median, `outlier_runs` how many exceed the median by over 0.1% (about one run per process
    carries a ~0.4M-instruction extra at a time-dependent position; the median drops it).
    """
    model = _check_model(path)
    if cpu not in _CPUINFO:
        raise FacekdError(f"--arm-cpus: unknown CPU {cpu!r}; choose from: {', '.join(_CPUINFO)}")
    prefix = Path(prefix).expanduser() if prefix else default_prefix()
    ok, reason = arm_toolchain_status(prefix)
    if not ok:
        raise FacekdError(reason)
    setup = json.loads((prefix / "setup.json").read_text())
    digest = sha256_file(model)
    cache = prefix / "cache" / f"{digest[:16]}-{cpu}-ort{setup['onnxruntime']}-{_source_hash()}-w{warmup}r{runs}.json"
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
        "onnxruntime": guest["onnxruntime"], "guest_python": guest["python"], "numpy": guest["numpy"],
        "qemu": setup.get("qemu"), "emulation_wall_s": round(wall, 2), "cached": False,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(cache, record)
    return record


def arm_instructions(path: str | os.PathLike, cpus: Sequence[str] = ARM_CPUS, *,
                     prefix: str | os.PathLike | None = None, use_cache: bool = True) -> dict[str, int]:
    """aarch64 instructions per inference of an ONNX model under QEMU, per `-cpu` model (one intra-op thread).

    Raises FacekdError saying what is missing when the toolchain is not installed (see `arm_toolchain_status`).
    """
    return {cpu: arm_instruction_record(path, cpu, prefix=prefix, use_cache=use_cache)["instructions"]
            for cpu in cpus}


# ---------------------------------------------------------------------------------------------------------------
# emulated ARM cost: one-time setup

def _run(cmd: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise FacekdError(f"{what}: {cmd[0]} not found") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise FacekdError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


def _debian_codename() -> str:
    fields = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        fields[key] = value.strip('"')
    codename = fields.get("VERSION_CODENAME")
    if fields.get("ID") != "debian" or not codename:
        raise FacekdError("--arm-setup needs Debian (apt-get, dpkg and Debian's arm64 packages); "
                          f"this is {fields.get('PRETTY_NAME', 'an unknown system')}")
    return codename


def _ensure_host_packages(log: Callable[[str], None]) -> None:
    missing = [pkg for tool, pkg in (("qemu-aarch64", "qemu-user"), ("gcc", "gcc"), ("apt-get", "apt"),
                                     ("dpkg-deb", "dpkg"), ("xz", "xz-utils")) if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise FacekdError(f"missing host packages {missing}; install them: sudo apt-get install -y {' '.join(missing)}")
    log(f"installing host packages: {' '.join(missing)}")
    _run(["apt-get", "update", "-q"], "apt-get update")
    _run(["apt-get", "install", "-y", "-q", *missing], f"apt-get install {' '.join(missing)}",
         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _apt_options(work: Path, codename: str, arch: str | None, kind: str) -> list[str]:
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"signed-by={keyring}" if Path(keyring).is_file() else ""
    opts = " ".join(x for x in (f"arch={arch}" if arch else "", signed) if x)
    opts = f"[{opts}] " if opts else ""
    sources = work / f"{kind}.list"
    sources.write_text("".join(f"{kind} {opts}http://deb.debian.org/{repo} {suite} main\n" for repo, suite in (
        ("debian", codename), ("debian", f"{codename}-updates"), ("debian-security", f"{codename}-security"))))
    lists = work / f"lists-{kind}"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (work / "archives/partial").mkdir(parents=True, exist_ok=True)
    options = [f"-oDir::Etc::SourceList={sources}", f"-oDir::Etc::SourceParts={work / 'no-parts'}",
               f"-oDir::State::Lists={lists}", f"-oDir::Cache={work}", "-oDir::State::Status=/dev/null",
               "-oAPT::Sandbox::User=root", "-q"]
    if arch:
        options += [f"-oAPT::Architecture={arch}", f"-oAPT::Architectures={arch}"]
    return options


def _install_plugin_header(prefix: Path, work: Path, codename: str, log: Callable[[str], None]) -> None:
    header = prefix / "include" / PLUGIN_HEADER
    if header.is_file():
        return
    # No Debian binary package ships qemu-plugin.h; the qemu source package (matching qemu-user) has it.
    version = subprocess.run(["dpkg-query", "-W", "-f=${source:Version}", "qemu-user"], capture_output=True,
                             text=True).stdout.strip()
    options = _apt_options(work, codename, None, "deb-src")
    log("fetching qemu-plugin.h from the Debian qemu source package")
    _run(["apt-get", *options, "update"], "apt-get update (deb-src)")
    src = work / "qemu-src"
    src.mkdir(exist_ok=True)
    try:
        _run(["apt-get", *options, "source", "--download-only", f"qemu={version}" if version else "qemu"],
             "apt-get source qemu", cwd=src)
    except FacekdError:
        _run(["apt-get", *options, "source", "--download-only", "qemu"], "apt-get source qemu", cwd=src)
    tarballs = sorted(src.glob("qemu_*.orig.tar.*"))
    if not tarballs:
        raise FacekdError("apt-get source qemu gave no orig tarball")
    _run(["tar", "-xf", str(tarballs[0]), "-C", str(src), "--wildcards", f"*/include/qemu/{PLUGIN_HEADER}"],
         "extracting qemu-plugin.h")
    found = sorted(src.glob(f"*/include/qemu/{PLUGIN_HEADER}"))
    if not found:
        raise FacekdError(f"{PLUGIN_HEADER} not in {tarballs[0].name}")
    header.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found[0], header)
    shutil.rmtree(src)


def _install_guest_python(prefix: Path, work: Path, codename: str, log: Callable[[str], None]) -> str:
    root = prefix / "root"
    options = _apt_options(work, codename, "arm64", "deb")
    log("downloading aarch64 Python from Debian (host dpkg untouched)")
    _run(["apt-get", *options, "update"], "apt-get update (arm64)")
    depends = _run(["apt-cache", *options, "depends", "python3-minimal"], "apt-cache depends python3-minimal").stdout
    match = re.search(r"Depends: python(3\.\d+)-minimal", depends)
    if not match:
        raise FacekdError("cannot tell which Python version python3-minimal (arm64) depends on")
    py = match.group(1)
    debs = work / "debs"
    debs.mkdir(exist_ok=True)
    _run(["apt-get", *options, "download", *[name.format(py=py) for name in _ARM_DEBS]],
         "apt-get download (arm64)", cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
    return py


def _install_wheels(prefix: Path, work: Path, py: str, log: Callable[[str], None]) -> dict[str, str]:
    import onnxruntime

    site = prefix / "root/usr/lib/python3/dist-packages"
    wheels = work / "wheels"
    wheels.mkdir(exist_ok=True)
    # The same onnxruntime as the host, so host latency and emulated counts come from the same kernels.
    version = onnxruntime.__version__
    log(f"downloading aarch64 wheels: onnxruntime=={version}, numpy (for Python {py})")
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                                            "manylinux2014_aarch64", "manylinux_2_17_aarch64")]
    tag = py.replace(".", "")
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", *platforms,
          f"--python-version={py}", "--implementation=cp", f"--abi=cp{tag}", "-d", str(wheels),
          f"onnxruntime=={version}", "numpy"], f"pip download onnxruntime=={version} numpy (aarch64, cp{tag})")
    for stale in [*site.glob("onnxruntime*"), *site.glob("numpy*")]:  # a previous setup's versions
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    found: dict[str, str] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        name, ver = wheel.name.split("-")[:2]
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.infolist():
                target = zf.extract(member, site)
                mode = member.external_attr >> 16
                if mode:
                    os.chmod(target, mode & 0o777)
        found[name.lower()] = ver
    return found


def _write_overlays(prefix: Path) -> None:
    for cpu, (variant, part, revision, features) in _CPUINFO.items():
        overlay = prefix / "cpu" / cpu
        (overlay / "proc").mkdir(parents=True, exist_ok=True)
        (overlay / "proc/cpuinfo").write_text(
            f"processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
            f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: {revision}\n\n")
        for name in ("lib", "usr", "etc"):
            link = overlay / name
            if not link.is_symlink():
                link.symlink_to(Path("../../root") / name)


def arm_setup(prefix: str | os.PathLike | None = None, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Install what counting emulated ARM instructions needs into `prefix`; idempotent (finished steps are kept).

    Host: qemu-user and gcc (apt-get install when missing and root). Prefix: qemu-plugin.h from Debian's qemu source
    package, the compiled plugin, aarch64 Debian packages for Python (unpacked with dpkg-deb, the host's dpkg
    untouched), numpy and onnxruntime aarch64 wheels from PyPI, and a /proc/cpuinfo per emulated CPU.
    """
    prefix = Path(prefix).expanduser() if prefix else default_prefix()
    start = time.perf_counter()
    if (prefix / "setup.json").is_file() and arm_toolchain_status(prefix)[0]:
        import onnxruntime

        setup = json.loads((prefix / "setup.json").read_text())
        if setup.get("onnxruntime") == onnxruntime.__version__:  # else: follow the host's onnxruntime
            _build_plugin(prefix)
            log(f"already set up in {prefix}")
            return setup
    prefix.mkdir(parents=True, exist_ok=True)
    codename = _debian_codename()
    _ensure_host_packages(log)
    qemu_version = _run([_qemu() or "qemu-aarch64", "--version"], "qemu-aarch64 --version").stdout.split("\n")[0]
    if "-plugin" not in subprocess.run([_qemu(), "-h"], capture_output=True, text=True).stdout:
        raise FacekdError(f"{qemu_version} was built without TCG plugin support (-plugin)")
    work = prefix / "tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "no-parts").mkdir()
    try:
        _install_plugin_header(prefix, work, codename, log)
        plugin = _build_plugin(prefix)
        py = _install_guest_python(prefix, work, codename, log)
        versions = _install_wheels(prefix, work, py, log)
        _write_overlays(prefix)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    python = _guest_python(prefix)
    log("checking the emulated Python imports onnxruntime")
    probe = _run([_qemu(), "-L", str(prefix / "cpu/cortex-a76"), "-cpu", "cortex-a76", str(python), "-I", "-c",
                  "import platform, numpy, onnxruntime; print(platform.machine(), onnxruntime.__version__)"],
                 "emulated Python smoke test", env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"})
    setup = {"qemu": qemu_version.replace("qemu-aarch64 version ", ""), "python": py,
             "onnxruntime": versions.get("onnxruntime"), "numpy": versions.get("numpy"), "plugin": plugin.name,
             "debian": codename, "probe": probe.stdout.strip(), "setup_wall_s": round(time.perf_counter() - start, 1),
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(prefix / "setup.json", setup)
    size = sum(f.stat().st_size for f in prefix.rglob("*") if f.is_file() and not f.is_symlink())
    log(f"set up in {setup['setup_wall_s']} s, {size / 1e6:.0f} MB in {prefix}: {setup['probe']}")
    return setup


# ---------------------------------------------------------------------------------------------------------------
# command line

def table_values(latency: dict[str, Any] | None = None, arm: dict[str, int] | None = None) -> dict[str, Any]:
    """Results-table columns (facekd.table) from one `measure_latency` row (1 thread) and/or `arm_instructions`."""
    values: dict[str, Any] = {}
    if latency is not None:
        values["host_latency_ms"] = round(latency["median_ms"], 4)
        values["host_cpu"] = f"{latency['cpu']} x{latency['cores']} ({latency['arch']})"
        if latency["arm_latency_ms"] is not None:
            values["arm_latency_ms"] = round(latency["arm_latency_ms"], 4)
            values["arm_device"] = latency["arm_device"]
    for cpu, count in (arm or {}).items():
        values[f"arm_instr_{cpu.removeprefix('cortex-')}"] = count
    return values


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FacekdError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise FacekdError(f"{flag}: expected positive integers, got {text!r}")
    return values


def _print_table(rows: list[dict[str, Any]], arm: dict[str, dict[str, Any]]) -> None:
    first = rows[0]
    print(f"host: {first['cpu']}, {first['cores']} cores, {first['arch']}, onnxruntime {first['onnxruntime']}; "
          f"batch 1, {first['runs']} runs after {first['warmup']} warm-up, models interleaved")
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'model':<{width}}  threads  median ms    p90 ms  vs first")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['threads']:>7}  {r['median_ms']:>9.3f}  {r['p90_ms']:>8.3f}  "
              f"{r['ratio_vs_first']:>7.3f}x")
    if first["arm_latency_ms"] is None:
        print("ARM latency: not measured (this is not an aarch64 machine)")
    if arm:
        cpus = list(next(iter(arm.values())))
        print("emulated ARM cost, aarch64 instructions per inference (QEMU, 1 thread; instructions, not time):")
        print(f"{'model':<{width}}  " + "  ".join(f"{c:>14}" for c in cpus) + "  (median of runs; spread)")
        base = None
        for path, per_cpu in arm.items():
            name = Path(path).stem
            counts = [per_cpu[c]["instructions"] for c in cpus]
            base = base or counts
            spread = max(per_cpu[c]["spread"] for c in cpus)
            outliers = sum(n > per_cpu[c]["instructions"] * 1.001 for c in cpus
                           for n in per_cpu[c]["runs_instructions"])
            print(f"{name:<{width}}  " + "  ".join(f"{n:>14,}" for n in counts) +
                  f"  ({spread:.3%}; {outliers} outlier run(s))")
            if counts is not base:
                print(f"{'  vs first':<{width}}  " + "  ".join(f"{n / b:>13.3f}x" for n, b in zip(counts, base)))


def _resolve_models(specs: list[str], workdir: Path) -> dict[str, str]:
    """MODEL arguments -> ONNX paths: ONNX files as they are; facekd checkpoints and registry names exported.

    A registry name exports a freshly initialised model: fine for timing and instruction counts (fp32 work does
    not depend on weight values), never for accuracy.
    """
    resolved: dict[str, str] = {}
    for spec in specs:
        path = Path(spec)
        if path.suffix.lower() == ".onnx" or (path.is_file() and path.suffix.lower() not in (".safetensors", ".pth",
                                                                                            ".pt")):
            resolved[spec] = spec  # measure_latency checks existence and format
            continue
        if not path.is_file() and ("/" in spec or path.suffix):
            raise FacekdError(f"model not found: {spec}")
        from facekd.models import create_model, export_onnx, load_checkpoint  # CLI only: higher floor

        model = load_checkpoint(path) if path.is_file() else create_model(spec)
        out = workdir / f"{path.stem if path.is_file() else spec.replace(':', '_')}.onnx"
        resolved[spec] = str(export_onnx(model.eval(), out))
    return resolved


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluate.latency", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[
                                         __doc__.index("\n\n") + 2:])
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="ONNX file; or a facekd checkpoint / registry name, exported to ONNX first")
    parser.add_argument("--threads", default="1", help="intra-op thread counts, comma-separated (default 1)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--arm-emulate", action="store_true",
                        help="also count aarch64 instructions per inference under QEMU (needs --arm-setup once)")
    parser.add_argument("--arm-cpus", default=",".join(ARM_CPUS), help=f"QEMU -cpu models (default {','.join(ARM_CPUS)})")
    parser.add_argument("--arm-setup", action="store_true", help="install the emulation toolchain, then continue")
    parser.add_argument("--prefix", default=None, help="emulation toolchain prefix (default $FACEKD_ARM_PREFIX "
                                                       "or ~/.cache/facekd/arm)")
    parser.add_argument("--no-cache", action="store_true", help="recount instructions even when cached")
    parser.add_argument("--table", default=None, metavar="CSV",
                        help="write the 1-thread latency / instruction columns into this results table, on the "
                             "rows whose artifact is the model path")
    parser.add_argument("--device", help="measure on a real device instead: ssh://user@host[:port] or adb:SERIAL "
                                         "(evaluate.remote; .onnx or .tflite files)")
    args = parser.parse_args(argv)
    cpus = [c.strip() for c in args.arm_cpus.split(",") if c.strip()]
    for cpu in cpus:
        if cpu not in _CPUINFO:
            raise FacekdError(f"--arm-cpus: unknown CPU {cpu!r}; choose from: {', '.join(_CPUINFO)}")
    threads = _int_list(args.threads, "--threads")
    if args.arm_setup:
        log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
        arm_setup(args.prefix, log=log)
        if not args.models:
            return 0
    if not args.models:
        parser.error("give at least one MODEL (or --arm-setup)")
    if args.device:
        from evaluate.remote import run_cli
        return run_cli(args.models, args.device, threads=threads, runs=args.runs, warmup=args.warmup,
                       table=args.table, as_json=args.json)
    with tempfile.TemporaryDirectory(prefix="facekd-latency-") as workdir:
        onnx_of = _resolve_models(args.models, Path(workdir))
        rows = measure_latency(list(onnx_of.values()), threads=threads, runs=args.runs, warmup=args.warmup)
        arm: dict[str, dict[str, Any]] = {}
        if args.arm_emulate:
            for spec, path in onnx_of.items():
                arm[spec] = {cpu: arm_instruction_record(path, cpu, prefix=args.prefix, use_cache=not args.no_cache)
                             for cpu in cpus}
    for spec, path in onnx_of.items():
        for row in rows:
            if row["model"] == str(Path(path)) and spec != path:
                row["model"], row["exported_from"] = spec, spec
    if args.table:
        from facekd.table import update_columns

        for spec in args.models:
            one = next((r for r in rows if r["model"] == str(Path(spec)) and r["threads"] == 1), None)
            counts = {c: rec["instructions"] for c, rec in arm.get(spec, {}).items()}
            hits = update_columns({"artifact": spec}, table_values(one, counts), args.table)
            print(f"{args.table}: updated {hits} row(s) whose artifact is {spec}", file=sys.stderr)
    if args.json:
        print(json.dumps({"latency": rows, "arm_instructions": arm}, indent=2))
    else:
        _print_table(rows, arm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
