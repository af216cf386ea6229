"""The emulation prefix: what counting aarch64 instructions under QEMU needs, installed once (`--arm-setup`).

Host: qemu-user and gcc. Prefix ($FACEKD_ARM_PREFIX, default ~/.cache/facekd/arm):
    root/            aarch64 Debian packages + numpy/onnxruntime wheels (usr/lib/python3/dist-packages), and the
                     ai-edge-litert wheel when PyPI has one (optional: `.tflite` counting; ONNX works without it)
    cpu/<name>/      per -cpu model: proc/cpuinfo + links to root/{lib,usr,etc}; given to qemu as -L
    include/         qemu-plugin.h from the Debian qemu source package matching qemu-user
    lib/             the compiled plugin, named by a hash of its source
    cache/           one JSON per (model sha256, cpu, runtime + version, runner+plugin source), see `emulate`
    setup.json       what setup installed, written last; "litert" (its version) or "litert_error" (why not) is
                     added by a separate step, so an older prefix gains LiteRT without being rebuilt
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from facekd.io import FacekdError, atomic_write_json

ARM_CPUS = ("cortex-a53", "cortex-a72", "cortex-a76")
ARM_DIR = Path(__file__).resolve().parent
PLUGIN_SOURCE = ARM_DIR / "insncount.c"
PLUGIN_HEADER = "qemu-plugin.h"

# /proc/cpuinfo served to the emulated process per -cpu model: onnxruntime's cpuinfo library crashes on the host's
# x86 file, and picks kernels by micro-architecture (CPU part) and features (asimddp = dot product on the A76).
_CPUINFO = {
    "cortex-a53": ("0x0", "0xd03", "4", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a72": ("0x0", "0xd08", "3", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a76": ("0x4", "0xd0b", "1", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                   "asimdrdm lrcpc dcpop asimddp"),
}
# aarch64 Debian packages that make a Python able to import numpy and onnxruntime ({py} = 3.11 on bookworm).
_ARM_DEBS = ("python{py}-minimal", "libpython{py}-minimal", "libpython{py}-stdlib", "libc6", "zlib1g", "libexpat1",
             "libffi8", "libgcc-s1", "libstdc++6")


RUNTIMES = {".onnx": "onnxruntime", ".tflite": "litert"}
_SITE = "root/usr/lib/python3/dist-packages"


def runtime_of(path: str | os.PathLike) -> str:
    """The runtime that runs a model file: onnxruntime for `.onnx`, litert for `.tflite`."""
    return RUNTIMES.get(Path(path).suffix.lower(), "onnxruntime")


def default_prefix() -> Path:
    """Where `--arm-setup` installs the emulation toolchain: $FACEKD_ARM_PREFIX, else ~/.cache/facekd/arm."""
    return Path(os.environ.get("FACEKD_ARM_PREFIX") or "~/.cache/facekd/arm").expanduser()


def _qemu() -> str | None:
    return shutil.which("qemu-aarch64")


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


def _setup_hint(prefix: Path) -> str:
    return f"run: python -m evaluate.latency --arm-setup --prefix {prefix}"


def arm_toolchain_status(prefix: str | os.PathLike | None = None, runtime: str = "onnxruntime") -> tuple[bool, str]:
    """(True, summary) when instructions of `runtime`'s models (onnxruntime, litert) can be counted, else (False,
    what is missing and how to install it)."""
    prefix = Path(prefix).expanduser() if prefix else default_prefix()
    setup_hint = _setup_hint(prefix)
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
    if runtime == "litert":
        ok, reason = litert_status(prefix, setup)
        if not ok:
            return False, reason
    return True, (f"qemu-aarch64 {setup.get('qemu', '?')}, aarch64 Python {setup.get('python', '?')}, "
                  f"onnxruntime {setup.get('onnxruntime', '?')}, LiteRT {setup.get('litert') or 'absent'} in {prefix}")


def arm_enabled(choice: str, runtime: str = "onnxruntime", *, prefix: str | os.PathLike | None = None,
                log: Callable[[str], None] = print) -> bool:
    """The `--arm auto|on|off` policy every stage shares: off never counts; on counts or fails in one line (call it
    before heavy work); auto counts when the prefix can count `runtime`'s models, else says why in one line."""
    if choice == "off":
        return False
    ok, reason = arm_toolchain_status(prefix, runtime)
    if not ok and choice == "on":
        raise FacekdError(f"--arm on: {reason}")
    if not ok:
        log(f"emulated ARM instructions skipped: {reason}")
    return ok


def litert_status(prefix: Path, setup: dict[str, Any]) -> tuple[bool, str]:
    """Whether the prefix's aarch64 Python has LiteRT (`setup.json` of a prefix that is otherwise complete)."""
    hint = _setup_hint(prefix)
    if setup.get("litert") and (prefix / _SITE / "ai_edge_litert/interpreter.py").is_file():
        return True, f"LiteRT {setup['litert']} in {prefix}"
    if setup.get("litert_error"):
        return False, f"LiteRT instruction counts unavailable: {setup['litert_error']}; {hint} to retry"
    return False, f"LiteRT instruction counts unavailable: no aarch64 ai-edge-litert in {prefix}; {hint}"


# ---------------------------------------------------------------------------------------------------------------
# one-time setup

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


def _download_wheels(prefix: Path, wheels: Path, py: str, specs: list[str]) -> dict[str, str]:
    """pip-download aarch64 CPython `py` wheels of `specs` (no dependencies) and unpack them into the prefix's
    site-packages, replacing a previous setup's versions; {distribution: version}."""
    site = prefix / _SITE
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                                            "manylinux2014_aarch64", "manylinux_2_17_aarch64")]
    tag = py.replace(".", "")
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", *platforms,
          f"--python-version={py}", "--implementation=cp", f"--abi=cp{tag}", "-d", str(wheels), *specs],
         f"pip download {' '.join(specs)} (aarch64, cp{tag})")
    found: dict[str, str] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        name, ver = wheel.name.split("-")[:2]
        for stale in site.glob(f"{name}*"):  # a previous setup's version
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.infolist():
                target = zf.extract(member, site)
                mode = member.external_attr >> 16
                if mode:
                    os.chmod(target, mode & 0o777)
        found[name.lower()] = ver
    return found


def _install_wheels(prefix: Path, work: Path, py: str, log: Callable[[str], None]) -> dict[str, str]:
    import onnxruntime

    # The same onnxruntime as the host, so host latency and emulated counts come from the same kernels.
    version = onnxruntime.__version__
    log(f"downloading aarch64 wheels: onnxruntime=={version}, numpy (for Python {py})")
    return _download_wheels(prefix, work / "wheels", py, [f"onnxruntime=={version}", "numpy"])


def _host_litert() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("ai-edge-litert")
    except metadata.PackageNotFoundError:
        return None


def install_litert(prefix: Path, *, log: Callable[[str], None] = print) -> dict[str, str]:
    """The optional LiteRT step: the aarch64 ai-edge-litert wheel (the host's version when the host has one, else
    PyPI's newest) into a finished prefix, checked by importing it under QEMU. Returns the setup.json entries:
    {"litert": version} or {"litert_error": why}; never raises, since ONNX counting does not need it. Its
    interpreter imports only numpy (already in the prefix), so none of the wheel's declared dependencies are
    installed."""
    setup = json.loads((prefix / "setup.json").read_text())
    version = _host_litert()
    spec = f"ai-edge-litert=={version}" if version else "ai-edge-litert"
    work = prefix / "tmp-litert"
    shutil.rmtree(work, ignore_errors=True)
    try:
        log(f"downloading the aarch64 LiteRT wheel: {spec} (for Python {setup['python']})")
        found = _download_wheels(prefix, work, setup["python"], [spec])
        probe = _run([_qemu() or "qemu-aarch64", "-L", str(prefix / "cpu/cortex-a76"), "-cpu", "cortex-a76",
                      str(_guest_python(prefix)), "-I", "-c",
                      "import ai_edge_litert; from ai_edge_litert.interpreter import Interpreter; "
                      "print(ai_edge_litert.__version__)"],
                     "emulated LiteRT import", env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"})
        entry = {"litert": probe.stdout.strip().splitlines()[-1] or found.get("ai_edge_litert", "?")}
        log(f"LiteRT {entry['litert']} imports in the emulated Python")
    except FacekdError as err:
        entry = {"litert_error": str(err)}
        log(f"LiteRT instruction counts unavailable ({err}); ONNX counting is unaffected")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry


def _record_litert(prefix: Path, setup: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Run the LiteRT step on a finished prefix unless it already holds the wanted version; update setup.json."""
    wanted = _host_litert()
    if setup.get("litert") and (wanted is None or setup["litert"] == wanted) and litert_status(prefix, setup)[0]:
        return setup
    setup = {k: v for k, v in setup.items() if k not in ("litert", "litert_error")}
    setup.update(install_litert(prefix, log=log))
    atomic_write_json(prefix / "setup.json", setup)
    return setup


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
    untouched), numpy and onnxruntime aarch64 wheels from PyPI, and a /proc/cpuinfo per emulated CPU; then, as its
    own step that may fail without failing the setup, the aarch64 ai-edge-litert wheel (`install_litert`).
    """
    prefix = Path(prefix).expanduser() if prefix else default_prefix()
    start = time.perf_counter()
    if (prefix / "setup.json").is_file() and arm_toolchain_status(prefix)[0]:
        import onnxruntime

        setup = json.loads((prefix / "setup.json").read_text())
        if setup.get("onnxruntime") == onnxruntime.__version__:  # else: follow the host's onnxruntime
            _build_plugin(prefix)
            setup = _record_litert(prefix, setup, log)  # a prefix set up before LiteRT gains it here
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
    setup = _record_litert(prefix, setup, log)
    size = sum(f.stat().st_size for f in prefix.rglob("*") if f.is_file() and not f.is_symlink())
    log(f"set up in {setup['setup_wall_s']} s, {size / 1e6:.0f} MB in {prefix}: {setup['probe']}")
    return setup

