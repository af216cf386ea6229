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
    (["{txt}"], "latency is measured on ONNX (onnxruntime) or .tflite (LiteRT) files"),
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


# ---------------------------------------------------------------------------------------------------------------
# .tflite models (LiteRT) and the emulation prefix's optional LiteRT step; counting under QEMU: test_latency_arm.py

DATA = Path(__file__).parent / "data"
TINY_TFLITE = {k: DATA / f"tiny_facenet_{k}.tflite" for k in ("fp32", "int8")}  # see test_latency_arm.py
try:
    import ai_edge_litert  # noqa: F401
    _LITERT = ""
except ImportError as err:
    _LITERT = f'optional extra not installed (pip install -e ".[litert]"): {err}'
needs_litert = pytest.mark.skipif(bool(_LITERT), reason=_LITERT)


def test_cache_key_names_runtime_and_version(tmp_path: Path) -> None:
    from evaluate.arm.emulate import cache_path

    key = dict(prefix=tmp_path, digest="ab" * 32, cpu="cortex-a72", warmup=3, runs=5)
    ort_entry = cache_path(runtime="onnxruntime", version="1.32.0", **key)
    lite = cache_path(runtime="litert", version="2.3.0", **key)
    assert ort_entry.name.startswith("abababababababab-cortex-a72-ort1.32.0-")  # the key ONNX entries always had
    assert lite.name.startswith("abababababababab-cortex-a72-litert2.3.0-") and lite.name.endswith("-w3r5.json")
    assert cache_path(runtime="litert", version="2.4.0", **key) != lite
    assert lite.parent == ort_entry.parent == tmp_path / "cache"


def test_litert_status_says_why_in_one_line(tmp_path: Path) -> None:
    from evaluate.arm.prefix import litert_status

    failed = "pip download ai-edge-litert==9.9 (aarch64, cp311) failed (exit 1): no matching distribution"
    ok, why = litert_status(tmp_path, {"litert_error": failed})
    assert not ok and why == (f"LiteRT instruction counts unavailable: {failed}; run: python -m evaluate.latency "
                              f"--arm-setup --prefix {tmp_path} to retry")
    ok, why = litert_status(tmp_path, {"litert": "2.3.0"})  # recorded, but the files are gone
    assert not ok and "no aarch64 ai-edge-litert" in why and "\n" not in why
    module = tmp_path / "root/usr/lib/python3/dist-packages/ai_edge_litert/interpreter.py"
    module.parent.mkdir(parents=True)
    module.write_text("")
    assert litert_status(tmp_path, {"litert": "2.3.0"}) == (True, f"LiteRT 2.3.0 in {tmp_path}")


def test_litert_step_failure_is_recorded_and_onnx_setup_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluate.arm import prefix as arm_prefix

    before = {"python": "3.11", "onnxruntime": "1.32.0", "qemu": "7.2"}
    (tmp_path / "setup.json").write_text(json.dumps(before))

    def offline(cmd: list[str], what: str, **kwargs: object) -> None:
        raise FacekdError(f"{what} failed (exit 1): no network")

    monkeypatch.setattr(arm_prefix, "_run", offline)
    logged: list[str] = []
    setup = arm_prefix._record_litert(tmp_path, before, logged.append)
    reason = setup["litert_error"]
    assert reason.startswith("pip download ai-edge-litert") and reason.endswith("failed (exit 1): no network")
    assert json.loads((tmp_path / "setup.json").read_text()) == {**before, "litert_error": reason}
    assert any("ONNX counting is unaffected" in line for line in logged)
    assert not (tmp_path / "tmp-litert").exists()


@needs_litert
def test_tflite_timed_in_litert_beside_onnx(models: tuple[Path, Path]) -> None:
    rows = latency.measure_latency([TINY_TFLITE["fp32"], models[0]], runs=5, warmup=1)
    assert [(r["name"], r["runtime"]) for r in rows] == [("tiny_facenet_fp32", "litert"), ("small", "onnxruntime")]
    assert rows[0]["runtime_version"] == ai_edge_litert.__version__ and rows[1]["runtime_version"] == ort.__version__
    assert rows[0]["xnnpack"] == {"partitions": 1, "ops": 32, "ops_outside": 0, "outside": {}}
    assert all(r["median_ms"] > 0 for r in rows)


@needs_litert
def test_int8_tflite_gets_the_fp32_input_quantised() -> None:
    from evaluate.arm.runner import interpreter_inputs, make_interpreter

    outputs = []
    for kind in ("fp32", "int8"):
        it = make_interpreter(str(TINY_TFLITE[kind]))
        (index, x), = interpreter_inputs(it, seed=2)
        it.set_tensor(index, x)
        it.invoke()
        out = it.get_output_details()[0]
        y = it.get_tensor(out["index"])[0].astype(np.float64)
        scale, zero = out["quantization"]
        outputs.append((y - zero) * scale if kind == "int8" else y)
    assert x.dtype == np.int8
    fp32, int8 = outputs
    assert np.dot(fp32, int8) / np.linalg.norm(fp32) / np.linalg.norm(int8) > 0.98  # the same image, int8 rounding


@needs_litert
def test_delegate_partitions_against_an_undelegated_interpreter() -> None:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from evaluate.arm.runner import delegate_partitions, make_interpreter

    assert delegate_partitions(make_interpreter(str(TINY_TFLITE["int8"]))) == {
        "partitions": 1, "ops": 22, "ops_outside": 0, "outside": {}}
    plain = Interpreter(model_path=str(TINY_TFLITE["int8"]),
                        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    plain.allocate_tensors()
    found = delegate_partitions(plain)  # no delegate: every op runs in LiteRT's own kernels
    assert found["partitions"] == 0 and found["ops_outside"] == found["ops"] == 22
    assert found["outside"] == {"CONV_2D": 7, "ADD": 6, "DEPTHWISE_CONV_2D": 5, "PAD": 2, "TRANSPOSE": 1,
                                "FULLY_CONNECTED": 1}


def test_unreadable_tflite_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "corrupt.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(SystemExit) as exc:
        latency.main([str(bad), "--runs", "1", "--warmup", "0"])
    err = capsys.readouterr().err.strip()
    expected = "LiteRT cannot load it" if not _LITERT else "timing it needs LiteRT on this machine"
    assert exc.value.code == 2 and err.startswith(f"error: {bad}: ") and expected in err and "\n" not in err
