"""Shared I/O: the project's error type, atomic writes, hashing and fingerprints, JSON manifests, CLI wrapper.

Every stage writes its artifacts through these helpers so an interrupted job never leaves a half-written file,
and every artifact carries a manifest that says what made it (see `write_manifest`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from facekd import __version__


class FacekdError(Exception):
    """A user-facing problem (bad input, missing file, mismatched checkpoint...).

    The message is one line and says what is wrong and, where possible, what to do; command-line entry points
    print it as `error: <message>` and exit with status 2 instead of showing a traceback.
    """


def cli_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a `main(argv=None)` so a `FacekdError` (or Ctrl-C) ends the program with one clear line."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except FacekdError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold `directory/.lock` while a process writes the run directory; a second process is refused at once.

    An OS file lock (filelock): it goes away with the process that held it, so a crashed run never blocks --resume.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FacekdError(f"{directory} is in use by another process (lock {directory / '.lock'}); wait for it to "
                          "finish, or choose another --out") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; published artifacts get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FacekdError(f"{what} {path} is not valid JSON: {err}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where derived data that can be rebuilt lives (SynthFaces arrays, repaired ONNX files, embeddings):
    `cache_dir`, else $FACEKD_CACHE, else ~/.cache/facekd. Deleting it only costs recomputation."""
    root = cache_dir or os.environ.get("FACEKD_CACHE") or Path.home() / ".cache" / "facekd"
    return Path(root).expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able settings: equal settings give equal fingerprints."""
    text = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def git_commit() -> str:
    """The current git commit of the source tree (with `+dirty` when modified), or '' outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}+dirty" if sha and dirty else sha


def command_line() -> str:
    """The command that started this process, as a user would type it (`python -m pkg.cmd ARGS`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        program = "python -m " + spec.name.removesuffix(".__main__")
    else:
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join([program, *sys.argv[1:]])


def cpuinfo_fields() -> dict[str, str]:
    """/proc/cpuinfo as {field: value} (the first processor's value of each field; {} where it is not readable)."""
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


def cpu_model_name() -> str:
    """This machine's CPU model as /proc/cpuinfo names it ('' where it does not): figures name their CPU, since the
    project's machines differ (an Intel Xeon with AMX, an AMD EPYC with AVX2 only) and speeds compare only within one."""
    return cpuinfo_fields().get("model name", "")


def provenance(**extra: Any) -> dict[str, Any]:
    """What made an artifact: command line, facekd version, git commit, UTC time, plus `extra`."""
    return {
        "command": command_line(),
        "facekd_version": __version__,
        "git_commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def write_manifest(directory: str | os.PathLike, kind: str, settings: dict[str, Any], inputs: dict[str, str] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """Write `directory/manifest.json` for an artifact: its kind, settings, input fingerprints and provenance.

    `fingerprint` covers kind, settings and inputs, so a stage can skip work whose artifact already matches.
    """
    manifest = {
        "kind": kind,
        "settings": settings,
        "inputs": inputs or {},
        "fingerprint": fingerprint({"kind": kind, "settings": settings, "inputs": inputs or {}}),
        "provenance": provenance(),
        **extra,
    }
    atomic_write_json(Path(directory) / "manifest.json", manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / "manifest.json"
    return read_json(path, "artifact manifest") if path.is_file() else None


def check_choice(value: str, choices: list[str] | tuple[str, ...], flag: str) -> str:
    """Return `value` if allowed, else a one-line error naming the flag and the allowed values."""
    if value not in choices:
        raise FacekdError(f"{flag}: unknown value {value!r}; choose one of: {', '.join(choices)}")
    return value
