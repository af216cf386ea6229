"""results.report: markdown grouped per evaluation set, PNG plots, stored ROC curves, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from facekd import table
from facekd.io import FacekdError
from results import report


def test_report_renders_table_and_plots(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    table.ensure_literature(summary)
    run = tmp_path / "runs" / "demo" / "student"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"synthfaces": {"accuracy": 0.8, "roc": {
        "fpr": [0.0, 0.001, 0.1, 1.0], "tpr": [0.0, 0.3, 0.8, 1.0]}}}))
    rows = [table.model_row("student", "mobilefacenet", "demo", dataset="synthfaces", kd="feature",
                            metrics={"accuracy": 0.8, "std": 0.01}, file_bytes=4_100_000,
                            artifact=str(run / "model.onnx"), host_latency_ms=11.5, host_cpu="cpu x2",
                            arm_instr_a53=128_000_000),
            table.model_row("int8", "mobilefacenet", "demo", dataset="synthfaces",
                            metrics={"accuracy": 0.79, "std": 0.01}, file_bytes=1_200_000, host_latency_ms=8.0)]
    table.upsert_rows(rows, summary)
    result = report.main(["--summary", str(summary), "--out", str(tmp_path / "out")])
    assert result == 0
    md = (tmp_path / "out" / "summary.md").read_text()
    synth, lfw = md.index("## synthfaces"), md.index("## lfw")
    # the SynthFaces section holds only SynthFaces rows: literature LFW numbers never appear in it
    section = md[synth:lfw] if synth < lfw else md[synth:]
    assert "80.00 ± 1.00" in section and "97.32" not in section
    assert "kd=" not in section and "| feature |" in section
    plots = {p.name for p in (tmp_path / "out" / "plots").iterdir()}
    assert {"accuracy_vs_size.png", "latency.png", "arm_instructions.png", "roc_synthfaces.png"} <= plots
    for name in plots:
        assert (tmp_path / "out" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(4.0, 90.0), (1.0, 85.0), (2.0, 80.0), (8.0, 95.0), (8.0, 94.0)]
    assert report._pareto(points) == [(1.0, 85.0), (4.0, 90.0), (8.0, 95.0)]


def test_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FacekdError, match="results table not found"):
        report.build_report(tmp_path / "nope.csv", tmp_path)


def test_stored_roc_is_found_where_each_stage_writes_it(tmp_path: Path) -> None:
    """The trainer (metrics.json val.SET.roc), prune.run (metrics.json roc.SET) and quantize.ptq (fidelity.json
    roc.SET) each keep the ROC of the model they deliver; the report must find all three, and no other set's."""
    curve = {"fpr": [0.0, 0.01, 1.0], "tpr": [0.0, 0.5, 1.0]}
    layouts = {"student": ("metrics.json", {"val": {"synthfaces": {"accuracy": 0.8, "roc": curve}}}),
               "pruned": ("metrics.json", {"accuracy": {"pruned_finetuned": {}}, "roc": {"synthfaces": curve}}),
               "int8": ("fidelity.json", {"metrics": {}, "roc": {"synthfaces": curve}})}
    for stage, (name, content) in layouts.items():
        folder = tmp_path / stage
        folder.mkdir()
        (folder / name).write_text(json.dumps(content))
        assert report._stored_roc(str(folder / "model.onnx"), "synthfaces") == (curve["fpr"], curve["tpr"]), stage
        assert report._stored_roc(str(folder / "model.onnx"), "lfw") is None
    assert report._stored_roc(str(tmp_path / "elsewhere" / "model.onnx"), "synthfaces") is None


def test_plots_keep_cpus_apart_and_name_each_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [table.model_row("int8", "mobilefacenet", run, dataset="synthfaces", metrics={"accuracy": acc},
                            file_bytes=size, host_latency_ms=ms, host_cpu=cpu)
            for run, acc, size, ms, cpu in [("a", 0.83, 820_000, 3.4, "Intel(R) Xeon(R) x2 (x86_64)"),
                                            ("a-unpruned", 0.83, 1_110_000, 3.1, "Intel(R) Xeon(R) x2 x86_64"),
                                            ("b", 0.80, 820_000, 31.6, "AMD EPYC x4 (x86_64)")]]
    table.upsert_rows(rows, tmp_path / "summary.csv")
    frame = table.read_table(tmp_path / "summary.csv")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.plot_latency(frame, tmp_path / "latency.png")
    [fig] = figures
    panels = {ax.get_title().split(" (")[0]: [t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes}
    assert panels == {"host latency on AMD EPYC x4 x86_64": ["int8: mobilefacenet (b)"],
                      "host latency on Intel(R) Xeon(R) x2 x86_64": ["int8: mobilefacenet (a)",
                                                                    "int8: mobilefacenet (a-unpruned)"]}
    report.plot_accuracy_vs_size(frame, tmp_path / "acc.png")
    labels = [t.get_text() for t in figures[-1].axes[0].texts]
    assert sorted(labels) == ["int8: mobilefacenet (a): 83.00%", "int8: mobilefacenet (a-unpruned): 83.00%",
                              "int8: mobilefacenet (b): 80.00%"]
    positions = sorted(t.get_position()[1] for t in figures[-1].axes[0].texts)  # equal accuracy, separate lines
    assert min(b - a for a, b in zip(positions, positions[1:])) > 0.02
