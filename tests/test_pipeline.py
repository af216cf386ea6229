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
    monkeypatch.setattr(table, "DEFAULT_PATH", Path("results/summary.csv"))  # as in a fresh clone
    argv = ["--preset", "smoke", "--teacher", "mobilefacenet", "--run", "smoke", "--arm", "off"]
    assert pipeline.main(argv) == 0
    # a smoke run writes only under runs/ and results/smoke/ (both git-ignored): the committed table is untouched
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()}
    assert {top for top, *_ in written} == {"runs", "results"} and {w for w in written if w[0] == "results"} == \
        {("results", "smoke")}
    frame = table.read_table(tmp_path / "results" / "smoke" / "summary.csv")
    measured = frame[frame["run"] == "smoke"]
    assert {"student", "pruned", "int8"} <= set(measured["stage"])
    from evaluate.verify import main as verify_main

    for stage in ("student", "pruned", "int8"):
        row = measured[measured["stage"] == stage].iloc[0]
        assert row["dataset"] == "synthfaces:tiny" and str(row["notes"]).startswith("smoke preset")
        assert row["host_latency_ms"] > 0 and row["file_bytes"] == Path(row["artifact"]).stat().st_size
        assert str(row["artifact"]).endswith(".onnx")
        capsys.readouterr()  # the row's accuracy is its artifact's, re-measured by evaluate.verify
        assert verify_main([str(row["artifact"]), "synthfaces:tiny", "--json"]) == 0
        printed = capsys.readouterr().out
        again = json.loads(printed[printed.index("{\n"):])["synthfaces:tiny"]
        assert row["accuracy"] == pytest.approx(again["accuracy"], abs=1e-9), stage
    sizes = measured.set_index("stage")["file_bytes"]
    assert sizes["int8"] < sizes["pruned"] < sizes["student"]
    assert (frame["stage"] == "literature").sum() == len(table.LITERATURE_ROWS)
    summary = (tmp_path / "results" / "smoke" / "summary.md").read_text()
    assert "their accuracy means nothing" in summary
    assert (tmp_path / "results" / "smoke" / "plots" / "accuracy_vs_size.png").is_file()
    state = json.loads((tmp_path / "runs" / "smoke" / "pipeline.json").read_text())
    # the litert step runs only with the litert extra installed (argv leaves --litert at auto)
    litert = "litert" if pipeline._litert_enabled("auto") else None
    assert set(state["done"]) == set(pipeline.STEPS) - ({"litert"} - {litert})

    capsys.readouterr()
    assert pipeline.main(argv) == 0  # resumes: every step is skipped
    out = capsys.readouterr().out
    assert all(f"[pipeline] {step}: done earlier" in out for step in pipeline.STEPS if step != "litert" or litert)

    with pytest.raises(FacekdError, match="kd differ"):
        pipeline.Pipeline(tmp_path / "runs" / "smoke", {**state["settings"], "kd": "feature"})


def test_bad_target_ratio_is_a_clear_error() -> None:
    with pytest.raises(SystemExit) as err:
        pipeline.main(["--target-macs-ratio", "1.5"])
    assert err.value.code == 2
