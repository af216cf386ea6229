"""The results table, `results/summary.csv`: its schema, the one writer and the one validated reader.

One row per (stage, model, run, dataset). Writers merge into the file under a lock and replace the file atomically,
so stages running at once never lose or corrupt a row, and re-running a stage replaces its own rows. Columns a stage
does not know (say, ARM instruction counts written later by `evaluate.latency`) are kept from the existing row.

Columns (documented in the README, kept in this order):
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from facekd import __version__
from facekd.io import FacekdError, atomic_write_text, provenance

DEFAULT_PATH = Path(os.environ.get("FACEKD_RESULTS", "results/summary.csv"))

STAGES = ("teacher", "student", "pruned", "int8", "literature", "study")
KEY = ("stage", "model", "run", "dataset")

# name -> (type, description). Types: str, int, float. Empty cells are missing values (NaN in pandas).
COLUMNS: dict[str, tuple[type, str]] = {
    "stage": (str, "teacher | student | pruned | int8 | literature | study"),
    "model": (str, "architecture name from the registry (e.g. r100, mobilefacenet) or the paper's model name"),
    "run": (str, "run name (runs/NAME), or the literature source's short name"),
    "kd": (str, "distillation losses used to train this model (e.g. feature+logit; none; empty when n/a)"),
    "params": (int, "parameter count"),
    "macs": (int, "multiply-adds for one image at the model's input size"),
    "file_bytes": (int, "size of the deployable artifact (ONNX for students, pruned and int8; checkpoint for teachers)"),
    "file_mb": (float, "file_bytes / 1e6"),
    "embedding_dim": (int, "embedding size"),
    "dataset": (str, "evaluation set (synthfaces, lfw, agedb_30, cfp_fp, ...)"),
    "accuracy": (float, "10-fold verification accuracy in [0, 1]"),
    "std": (float, "standard deviation of the 10 fold accuracies"),
    "tar_at_far_1e3": (float, "TAR at FAR = 1e-3 (insightface calculate_val)"),
    # results.study: a run row has `seed`; a variant's aggregate row has `n_seeds`, and its accuracy / std are the
    # mean / sample std (ddof=1) over seeds (one seed: that run's accuracy and fold std)
    "seed": (int, "training seed of a results.study run (empty elsewhere)"),
    "n_seeds": (int, "results.study aggregate row: number of seeds averaged"),
    "ci_low": (float, "aggregate row: 95% CI of the mean accuracy, low (t over seeds; 1 seed: t over the folds)"),
    "ci_high": (float, "aggregate row: 95% CI of the mean accuracy, high"),
    "p_value": (float, "aggregate row: exact McNemar p vs the study's no-KD variant, same pairs, seed i vs seed i"),
    "images_seen": (int, "training images seen (steps x batch size)"),
    "wall_s": (float, "training + evaluation wall seconds of the run (aggregate row: mean over seeds)"),
    "host_latency_ms": (float, "onnxruntime median latency, batch 1, 1 thread, on host_cpu"),
    "host_cpu": (str, "CPU model, core count and architecture the host latency was measured on"),
    "arm_latency_ms": (float, "median latency measured on a real aarch64 device; empty unless measured there"),
    "arm_device": (str, "the aarch64 device arm_latency_ms was measured on"),
    "arm_instr_a53": (int, "aarch64 instructions per inference under QEMU -cpu cortex-a53 (instructions, not time)"),
    "arm_instr_a72": (int, "same, cortex-a72"),
    "arm_instr_a76": (int, "same, cortex-a76 (has the dot-product instructions int8 kernels use)"),
    "target": (str, "core the int8 graph form was chosen for (a53, a72, a76, x86, host); empty: not chosen per target"),
    "runtime": (str, "inference runtime of the artifact: onnxruntime or litert (empty: onnxruntime)"),
    "hardware": (str, "where accuracy-producing training ran (e.g. cpu x2, cuda NVIDIA H200) or 'literature'"),
    "source": (str, "for literature rows: the publication; otherwise empty"),
    "artifact": (str, "path of the evaluated model file; ROC data lives in its run's metrics.json"),
    "facekd_version": (str, "facekd version that wrote the row"),
    "git_commit": (str, "git commit of the code that wrote the row"),
    "timestamp": (str, "UTC time the row was written"),
    "command": (str, "the command that made the row"),
    "notes": (str, "caveats, e.g. 'smoke preset: ...' on rows of a wiring check whose accuracy means nothing"),
}

# columns added after files were written: a file without them is still valid (their cells read as empty)
# read as empty from tables written before they existed
ADDED_COLUMNS = ("seed", "n_seeds", "ci_low", "ci_high", "p_value", "images_seen", "wall_s", "notes", "target",
                 "runtime")

__doc__ += "\n".join(f"- `{name}` ({kind.__name__}): {text}" for name, (kind, text) in COLUMNS.items())

_PAPER = "Chen et al. 2018, MobileFaceNets (arXiv:1804.07573)"
LITERATURE_ROWS: list[dict[str, Any]] = [
    {"stage": "literature", "model": "distilled baseline (4.0 MB)", "run": "wang2017", "dataset": "lfw",
     "accuracy": 0.9732, "file_mb": 4.0, "file_bytes": 4_000_000,
     "source": "Wang et al. 2017, model distillation for face recognition, as cited by " + _PAPER},
    {"stage": "literature", "model": "MobileFaceNet", "run": "chen2018-ms1m", "dataset": "lfw", "accuracy": 0.9955,
     "params": 990_000, "macs": 221_000_000, "file_mb": 4.0, "file_bytes": 4_000_000, "embedding_dim": 128,
     "source": _PAPER + ", trained on MS1M (refined), ArcFace loss"},
    {"stage": "literature", "model": "MobileFaceNet", "run": "chen2018-ms1m", "dataset": "agedb_30",
     "accuracy": 0.9607, "params": 990_000, "macs": 221_000_000, "file_mb": 4.0, "file_bytes": 4_000_000,
     "embedding_dim": 128, "source": _PAPER + ", trained on MS1M (refined), ArcFace loss"},
    {"stage": "literature", "model": "MobileFaceNet", "run": "chen2018-casia", "dataset": "lfw", "accuracy": 0.9928,
     "params": 990_000, "macs": 221_000_000, "file_mb": 4.0, "file_bytes": 4_000_000, "embedding_dim": 128,
     "source": _PAPER + ", trained on CASIA-WebFace"},
    {"stage": "literature", "model": "MobileFaceNet", "run": "chen2018-casia", "dataset": "agedb_30",
     "accuracy": 0.9305, "params": 990_000, "macs": 221_000_000, "file_mb": 4.0, "file_bytes": 4_000_000,
     "embedding_dim": 128, "source": _PAPER + ", trained on CASIA-WebFace"},
]
for _row in LITERATURE_ROWS:
    _row.setdefault("hardware", "literature")


def _format(name: str, value: Any) -> str:
    """Canonical text of one cell; raises FacekdError on a value that does not fit the column's type."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return ""
    kind = COLUMNS[name][0]
    try:
        if kind is int:
            number = float(value)
            if number != int(number):
                raise ValueError(f"{value!r} is not a whole number")
            return str(int(number))
        if kind is float:
            return repr(float(value))
    except (TypeError, ValueError) as err:
        raise FacekdError(f"results column {name!r}: {err}") from None
    return str(value).replace("\n", " ")


def _check_row(row: Mapping[str, Any], where: str) -> dict[str, str]:
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise FacekdError(f"{where}: unknown results column(s) {unknown}; the schema is in facekd/table.py")
    cells = {name: _format(name, row.get(name)) for name in COLUMNS}
    missing = [k for k in KEY if not cells[k]]
    if missing:
        raise FacekdError(f"{where}: results row lacks key column(s) {missing}")
    if cells["stage"] not in STAGES:
        raise FacekdError(f"{where}: stage {cells['stage']!r} is not one of {', '.join(STAGES)}")
    return cells


def _parse(text: str, path: Path) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    if header != [c for c in COLUMNS if c in header] or set(missing) - set(ADDED_COLUMNS):  # older files lack ADDED
        extra = [c for c in header if c not in COLUMNS]
        raise FacekdError(f"{path} does not have the summary schema (missing {missing}, unexpected {extra}); "
                          "move it aside and re-run the stages")
    rows = []
    for line, row in enumerate(reader, start=2):
        row = {**dict.fromkeys(ADDED_COLUMNS, ""), **row}
        if None in row or any(v is None for v in row.values()):
            raise FacekdError(f"{path}:{line}: wrong number of cells")
        rows.append(_check_row(row, f"{path}:{line}"))
    return rows


def read_rows(path: str | os.PathLike = DEFAULT_PATH) -> list[dict[str, str]]:
    """Rows as validated text cells (empty file or no file: no rows)."""
    path = Path(path)
    if not path.is_file():
        return []
    return _parse(path.read_text(encoding="utf-8"), path)


def read_table(path: str | os.PathLike = DEFAULT_PATH):
    """The table as a pandas DataFrame with typed columns (Int64 / float64 / string), validated."""
    import pandas as pd

    rows = read_rows(path)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for name, (kind, _) in COLUMNS.items():
        cells = frame[name].replace("", None)
        if kind is int:
            frame[name] = pd.to_numeric(cells).astype("Int64")
        elif kind is float:
            frame[name] = pd.to_numeric(cells).astype("float64")
        else:
            frame[name] = cells.astype("string")
    return frame


def _render(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=120)


def upsert_rows(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike = DEFAULT_PATH,
                stamp: bool = True) -> int:
    """Insert rows, or merge them into existing rows with the same (stage, model, run, dataset).

    A merged row takes every non-empty cell of the new row and keeps the old cells the new row leaves empty.
    With `stamp`, version, git commit, timestamp and command are filled in. Returns the number of rows written.
    """
    path = Path(path)
    info = provenance() if stamp else {}
    new = []
    for row in rows:
        row = dict(row)
        if stamp:
            for name in ("facekd_version", "git_commit", "timestamp", "command"):
                row.setdefault(name, info.get(name, __version__))
        new.append(_check_row(row, "new results row"))
    with _lock(path):
        existing = read_rows(path)
        index = {tuple(r[k] for k in KEY): i for i, r in enumerate(existing)}
        for row in new:
            key = tuple(row[k] for k in KEY)
            if key in index:
                old = existing[index[key]]
                existing[index[key]] = {c: row[c] if row[c] != "" else old[c] for c in COLUMNS}
            else:
                index[key] = len(existing)
                existing.append(row)
        atomic_write_text(path, _render(existing))
    return len(new)


def update_columns(match: Mapping[str, Any], values: Mapping[str, Any],
                   path: str | os.PathLike = DEFAULT_PATH) -> int:
    """Set `values` on every row whose cells equal `match` (e.g. latency for all datasets of one model)."""
    path = Path(path)
    match_cells = {k: _format(k, v) for k, v in match.items()}
    value_cells = {k: _format(k, v) for k, v in values.items() if k in COLUMNS}
    unknown = sorted(set(values) - set(COLUMNS))
    if unknown:
        raise FacekdError(f"unknown results column(s) {unknown}")
    with _lock(path):
        rows = read_rows(path)
        hits = 0
        for row in rows:
            if all(row.get(k) == v for k, v in match_cells.items()):
                row.update(value_cells)
                hits += 1
        if hits:
            atomic_write_text(path, _render(rows))
    return hits


def ensure_literature(path: str | os.PathLike = DEFAULT_PATH) -> None:
    """Add (or refresh) the literature rows, marked stage=literature with their source."""
    upsert_rows([{**row, "command": "facekd.table.LITERATURE_ROWS"} for row in LITERATURE_ROWS], path)


def model_row(stage: str, model: str, run: str, *, dataset: str, metrics: Mapping[str, Any] | None = None,
              **cells: Any) -> dict[str, Any]:
    """A results row from the verification metrics dict of `evaluate.metrics` plus any other columns."""
    metrics = metrics or {}
    row: dict[str, Any] = {"stage": stage, "model": model, "run": run, "dataset": dataset, **cells}
    if metrics:
        row["accuracy"] = metrics.get("accuracy")
        row["std"] = metrics.get("std")
        row["tar_at_far_1e3"] = (metrics.get("tar_at_far") or {}).get("1e-3")
    if row.get("file_bytes") not in (None, "") and row.get("file_mb") in (None, ""):
        row["file_mb"] = round(int(row["file_bytes"]) / 1e6, 4)
    return row
