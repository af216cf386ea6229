"""results/summary.csv: schema, merge-on-key, validation and concurrent writers."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from facekd import table
from facekd.io import FacekdError


def _row(i: int, **extra) -> dict:
    return table.model_row("student", "mobilefacenet", f"run{i}", dataset="synthfaces",
                           metrics={"accuracy": 0.5 + i / 1000, "std": 0.01, "tar_at_far": {"1e-3": 0.2}},
                           params=990_000, file_bytes=4_000_000, **extra)


def test_rerun_replaces_its_row_and_keeps_other_columns(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    table.upsert_rows([_row(1)], path)
    table.update_columns({"run": "run1"}, {"host_latency_ms": 11.5, "host_cpu": "test cpu"}, path)
    table.upsert_rows([{**_row(1), "accuracy": 0.9}], path)
    frame = table.read_table(path)
    assert len(frame) == 1
    assert frame.loc[0, "accuracy"] == pytest.approx(0.9)
    assert frame.loc[0, "host_latency_ms"] == pytest.approx(11.5)  # kept from the other stage's write
    assert frame.loc[0, "file_mb"] == pytest.approx(4.0)
    assert str(frame["params"].dtype) == "Int64" and frame.loc[0, "params"] == 990_000
    assert frame.loc[0, "facekd_version"] and frame.loc[0, "timestamp"]


def _writer(args: tuple[str, int]) -> None:
    path, worker = args
    for j in range(15):
        table.upsert_rows([_row(worker * 100 + j)], path)


def test_concurrent_writers_lose_no_row(tmp_path: Path) -> None:
    path = str(tmp_path / "summary.csv")
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_writer, [(path, w) for w in range(4)])
    frame = table.read_table(path)
    assert sorted(frame["run"]) == sorted(f"run{w * 100 + j}" for w in range(4) for j in range(15))


def test_schema_validation_rejects_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    table.upsert_rows([_row(1)], path)
    text = path.read_text()
    (tmp_path / "cols.csv").write_text(text.replace("accuracy", "acc", 1))
    with pytest.raises(FacekdError, match="missing \\['accuracy'\\]"):
        table.read_table(tmp_path / "cols.csv")
    (tmp_path / "cells.csv").write_text(text + "student,x\n")
    with pytest.raises(FacekdError, match="wrong number of cells"):
        table.read_table(tmp_path / "cells.csv")
    (tmp_path / "type.csv").write_text(text.replace(",990000,", ",lots,"))
    with pytest.raises(FacekdError, match="params"):
        table.read_table(tmp_path / "type.csv")
    with pytest.raises(FacekdError, match="stage 'bogus'"):
        table.upsert_rows([{**_row(2), "stage": "bogus"}], path)
    with pytest.raises(FacekdError, match="unknown results column"):
        table.upsert_rows([{**_row(2), "colour": "red"}], path)


def test_literature_rows_are_marked_with_source(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    table.ensure_literature(path)
    table.ensure_literature(path)  # idempotent
    frame = table.read_table(path)
    assert len(frame) == len(table.LITERATURE_ROWS)
    assert set(frame["stage"]) == {"literature"}
    assert frame["source"].str.len().min() > 10
    lfw = frame[(frame["run"] == "wang2017")].iloc[0]
    assert lfw["accuracy"] == pytest.approx(0.9732) and lfw["file_mb"] == pytest.approx(4.0)
