"""evaluate.latency on the host: interleaved onnxruntime timing, recorded fields, errors, table columns."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from evaluate import latency
from evaluate.arm.runner import make_inputs, make_session
from facekd.io import FacekdError


def tiny_onnx(path: Path, channels: tuple[int, ...] = (3, 8, 16), size: int = 16, seed: int = 0) -> Path:
    """A small conv net (Conv+Relu stack, global pool) with a symbolic batch dimension, written to `path`."""
    rng = np.random.default_rng(seed)
    nodes, weights, prev = [], [], "input"
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        weights += [numpy_helper.from_array((rng.standard_normal((cout, cin, 3, 3)) * 0.2).astype(np.float32), f"w{i}"),
                    numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["embedding"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels[0], size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", channels[-1]])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("latency")
    return tiny_onnx(d / "small.onnx"), tiny_onnx(d / "wider.onnx", channels=(3, 16, 32))


def test_measure_latency_records_runs_and_machine(models: tuple[Path, Path]) -> None:
    rows = latency.measure_latency(models, threads=(1,), runs=100, warmup=3)
    assert [r["name"] for r in rows] == ["small", "wider"]
    for row in rows:
        assert row["runs"] == 100 and len(row["times_ms"]) == 100
        assert all(t > 0 for t in row["times_ms"])
        assert row["min_ms"] <= row["median_ms"] <= row["p90_ms"] <= max(row["times_ms"])
        assert row["median_ms"] == pytest.approx(float(np.median(row["times_ms"])))
        assert row["arch"] == platform.machine() and row["cores"] == os.cpu_count()
        assert row["onnxruntime"] == ort.__version__ and row["cpu"]
        assert row["threads"] == 1 and len(row["sha256"]) == 64
    assert rows[0]["ratio_vs_first"] == 1.0
    assert rows[1]["ratio_vs_first"] == pytest.approx(rows[1]["median_ms"] / rows[0]["median_ms"])


@pytest.mark.skipif(platform.machine() in ("aarch64", "arm64"), reason="checks the non-ARM behaviour")
def test_arm_latency_stays_empty_off_arm(models: tuple[Path, Path]) -> None:
    row = latency.measure_latency(models[:1], runs=5, warmup=0)[0]
    assert row["arm_latency_ms"] is None and row["arm_device"] is None
    values = latency.table_values(row, {"cortex-a53": 10, "cortex-a76": 7})
    assert "arm_latency_ms" not in values and "arm_device" not in values
    assert values["arm_instr_a53"] == 10 and values["arm_instr_a76"] == 7
    assert values["host_latency_ms"] == pytest.approx(row["median_ms"], abs=1e-4)
    assert platform.machine() in values["host_cpu"]


def test_cli_json_two_thread_counts(models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert latency.main([str(models[0]), str(models[1]), "--threads", "1,2", "--runs", "100", "--warmup", "2",
                         "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["latency"]
    assert [(Path(r["model"]).name, r["threads"]) for r in rows] == [
        ("small.onnx", 1), ("wider.onnx", 1), ("small.onnx", 2), ("wider.onnx", 2)]
    for row in rows:
        assert {"arch", "cpu", "cores", "onnxruntime", "median_ms", "p90_ms", "arm_latency_ms", "arm_device"} <= set(row)
        assert row["median_ms"] <= row["p90_ms"] and len(row["times_ms"]) >= 100
    assert out["arm_instructions"] == {}


def test_inputs_are_batch_one_and_seeded(models: tuple[Path, Path]) -> None:
    session = make_session(str(models[0]))
    a, b = make_inputs(session, seed=3), make_inputs(session, seed=3)
    assert a["input"].shape == (1, 3, 16, 16) and a["input"].dtype == np.float32
    np.testing.assert_array_equal(a["input"], b["input"])
    assert not np.array_equal(a["input"], make_inputs(session, seed=4)["input"])


@pytest.mark.parametrize("argv, message", [
    (["missing.onnx"], "model not found: missing.onnx"),
    (["{txt}"], "latency is measured on ONNX files"),
    (["{bad}"], "onnxruntime cannot load it"),
    (["{model}", "--threads", "0"], "--threads: expected positive integers"),
    (["{model}", "--threads", "one"], "--threads: expected comma-separated integers"),
    (["{model}", "--arm-cpus", "cortex-m4"], "--arm-cpus: unknown CPU 'cortex-m4'"),
    (["mbf"], "'mbf' is an architecture name, not a trained model"),
    (["{cut}"], "cannot read safetensors checkpoint"),
])
def test_bad_input_is_one_line_error(argv: list[str], message: str, models: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"not a protobuf at all")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a safetensors header that ends after one byte
    argv = [a.format(txt=txt, bad=bad, model=models[0], cut=cut) for a in argv]
    with pytest.raises(SystemExit) as exc:
        latency.main(argv + ["--runs", "1", "--warmup", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_missing_toolchain_is_reported_not_estimated(models: tuple[Path, Path], tmp_path: Path) -> None:
    ok, reason = latency.arm_toolchain_status(tmp_path / "no-prefix")
    assert not ok and "--arm-setup" in reason
    with pytest.raises(FacekdError, match="--arm-setup"):
        latency.arm_instructions(models[0], prefix=tmp_path / "no-prefix")
