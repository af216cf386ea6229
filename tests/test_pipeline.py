"""End to end: `python -m results.pipeline --preset smoke` runs every stage, fills the table, and resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from facekd import table
from facekd.io import FacekdError
from results import pipeline


@pytest.mark.slow
def test_smoke_pipeline_fills_every_stage_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "smoke", "--teacher", "mobilefacenet", "--run", "smoke", "--arm", "off"]
    assert pipeline.main(argv) == 0
    frame = table.read_table(tmp_path / "results" / "summary.csv")
    measured = frame[frame["run"] == "smoke"]
    assert {"student", "pruned", "int8"} <= set(measured["stage"])
    for stage in ("student", "pruned", "int8"):
        row = measured[measured["stage"] == stage].iloc[0]
        assert 0.0 <= row["accuracy"] <= 1.0 and row["dataset"] == "synthfaces:tiny"
        assert row["host_latency_ms"] > 0 and row["file_bytes"] > 0
        assert str(row["artifact"]).endswith(".onnx") and Path(row["artifact"]).is_file()
    sizes = measured.set_index("stage")["file_bytes"]
    assert sizes["int8"] < sizes["pruned"] < sizes["student"]
    assert (frame["stage"] == "literature").sum() == len(table.LITERATURE_ROWS)
    assert (tmp_path / "results" / "summary.md").is_file()
    assert (tmp_path / "results" / "plots" / "accuracy_vs_size.png").is_file()
    state = json.loads((tmp_path / "runs" / "smoke" / "pipeline.json").read_text())
    assert set(state["done"]) == set(pipeline.STEPS)

    capsys.readouterr()
    assert pipeline.main(argv) == 0  # resumes: every step is skipped
    out = capsys.readouterr().out
    assert all(f"[pipeline] {step}: done earlier" in out for step in pipeline.STEPS)

    with pytest.raises(FacekdError, match="kd differ"):
        pipeline.Pipeline(tmp_path / "runs" / "smoke", {**state["settings"], "kd": "feature"})


def test_bad_target_ratio_is_a_clear_error() -> None:
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--target-macs-ratio", "1.5"])
    assert err.value.code == 2
