"""quantize.litert (optional extra `litert`): the twin-conv PReLU form is exact in PyTorch; fp32 .tflite matches
PyTorch; int8 .tflite is close, mostly int8 and runs as one XNNPACK partition."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from facekd.io import FacekdError
from quantize.calib import load_calibration_images, preprocess
from quantize.litert import main as litert_main, prelu_to_addrelu, prelu_to_twin_conv, rewrite_prelu
from test_quantize import PRE, TinyFaceNet

try:
    import ai_edge_litert  # noqa: F401
    import litert_torch  # noqa: F401
    _LITERT = True
except ImportError:
    _LITERT = False
needs_litert = pytest.mark.skipif(not _LITERT, reason='optional extra not installed: pip install -e ".[litert]"')


def test_twin_conv_prelu_is_exact_and_keeps_slopes_above_one():
    x = torch.from_numpy(preprocess(load_calibration_images("synthfaces:tiny", 8, seed=0), PRE))
    model = TinyFaceNet().eval()
    twin, counts = prelu_to_twin_conv(model)
    assert counts == {"rewritten": 5, "kept": 0}
    assert not any(isinstance(m, torch.nn.PReLU) for m in twin.modules())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
    mixed, counts = prelu_to_twin_conv(TinyFaceNet("mixed").eval())  # slopes > 1 cannot use Relu((1-a) y)
    assert counts == {"rewritten": 2, "kept": 4}


def test_addrelu_form_is_exact_and_keeps_slopes_above_one():
    x = torch.from_numpy(preprocess(load_calibration_images("synthfaces:tiny", 8, seed=0), PRE))
    model = TinyFaceNet().eval()
    rewritten, counts = prelu_to_addrelu(model)
    assert counts == {"rewritten": 5, "kept": 0} and not any(isinstance(m, torch.nn.PReLU) for m in rewritten.modules())
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), rtol=1e-6, atol=1e-6)
    assert prelu_to_addrelu(TinyFaceNet("mixed").eval())[1] == {"rewritten": 2, "kept": 4}  # x + relu((a-1)x) needs a <= 1
    assert rewrite_prelu(model, "prelu")[1] == {"rewritten": 0, "kept": 5}
    with pytest.raises(FacekdError, match="unknown LiteRT PReLU form 'leaky'; known: prelu, twin, maxmul, relu"):
        rewrite_prelu(model, "leaky")


def test_cli_refuses_onnx_input(tmp_path, capsys):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(SystemExit) as exc:
        litert_main([str(onnx_file)])
    assert exc.value.code == 2 and "pass the facekd checkpoint" in capsys.readouterr().err


@needs_litert
@pytest.mark.slow
def test_tflite_fp32_parity_and_int8_one_partition(tmp_path):
    from evaluate.latency import measure_latency
    from quantize.litert import TfliteEmbedder, export_tflite, op_histogram

    x = preprocess(load_calibration_images("synthfaces:tiny", 24, seed=0), PRE)
    model = TinyFaceNet().eval()
    fp32 = export_tflite(model, tmp_path / "fp32.tflite")
    int8 = export_tflite(prelu_to_twin_conv(model)[0], tmp_path / "int8.tflite", calib=x[:16])
    with torch.no_grad():
        ref = model(torch.from_numpy(x[16:])).numpy()
    np.testing.assert_allclose(TfliteEmbedder(fp32, PRE, 16).embed_float(x[16:]), ref, rtol=1e-4, atol=1e-4)
    got = TfliteEmbedder(int8, PRE, 16).embed_float(x[16:])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98, cos
    ops = op_histogram(int8)
    assert ops["DELEGATE"] == 1 and ops["CONV_2D"] == 7  # one XNNPACK partition, twin convs
    assert not {"PRELU", "MUL", "DEQUANTIZE", "QUANTIZE"} & set(ops)  # no float island left
    assert all(r["median_ms"] > 0 and r["runtime"] == "litert" for r in measure_latency([fp32, int8], runs=3, warmup=1))


@needs_litert
@pytest.mark.slow
def test_maxmul_form_is_int8_with_one_maximum_per_prelu(tmp_path):
    from evaluate.arm.runner import delegate_partitions, make_interpreter
    from quantize.litert import TfliteEmbedder, export_tflite, op_histogram, prelu_to_maxmul

    x = preprocess(load_calibration_images("synthfaces:tiny", 24, seed=0), PRE)
    model = TinyFaceNet().eval()
    mm, counts = prelu_to_maxmul(model)
    assert counts == {"rewritten": 5, "kept": 0}
    with torch.no_grad():
        ref = model(torch.from_numpy(x[16:])).numpy()
        assert np.array_equal(mm(torch.from_numpy(x[16:])).numpy(), ref)  # bit-exact in float
    int8 = export_tflite(mm, tmp_path / "int8.tflite", calib=x[:16])
    ops = op_histogram(int8)
    assert ops["MAXIMUM"] == 5 and ops["MUL"] == 5 and ops["CONV_2D"] == 4
    assert not {"PRELU", "DEQUANTIZE", "QUANTIZE"} & set(ops)
    # XNNPACK takes no int8 MAXIMUM: the five maxima run outside it and split the graph around them
    split = delegate_partitions(make_interpreter(str(int8)))
    assert split["outside"] == {"MAXIMUM": 5} and split["partitions"] == ops["DELEGATE"] > 1
    got = TfliteEmbedder(int8, PRE, 16).embed_float(x[16:])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98, cos


@needs_litert
def test_cli_arm_on_without_litert_in_the_prefix_is_refused_before_conversion(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACEKD_ARM_PREFIX", str(tmp_path / "no-prefix"))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")  # never read: the refusal comes first
    with pytest.raises(SystemExit) as exc:
        litert_main([str(ckpt), "--arm", "on", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: --arm on: no emulation prefix at ") and "\n" not in err
    assert not (tmp_path / "out").exists()


def _run_cli_on_tiny_checkpoint(tmp_path, *argv: str):
    """quantize.litert on a TinyFaceNet checkpoint at tmp_path/pruned (16 calibration images, 3 timed runs, run
    `t`); returns (fidelity.json, results table path)."""
    from facekd.models import register_model, save_checkpoint

    name = "litert-test-tinyfacenet"
    register_model(name, kind="any")(lambda **kw: TinyFaceNet(**kw))
    save_checkpoint(TinyFaceNet().eval(), tmp_path / "pruned" / "model.safetensors", arch=name, kwargs={})
    results = tmp_path / "summary.csv"
    assert litert_main([str(tmp_path / "pruned" / "model.safetensors"), "--calib", "synthfaces:tiny", "--num-calib",
                        "16", "--eval", "synthfaces:tiny", "--runs", "3", "--run", "t", "--results", str(results),
                        *argv]) == 0
    return json.loads((tmp_path / "litert" / "fidelity.json").read_text()), results


@needs_litert
@pytest.mark.slow
def test_cli_reports_partitions_and_fills_arm_columns_when_the_prefix_can(tmp_path, capsys):
    """fidelity.json and the two rows: XNNPACK partitions of both graphs; with the aarch64 LiteRT in the emulation
    prefix (`--arm auto`), instructions per core in the rows equal to what evaluate.latency counts for the file."""
    from evaluate.latency import ARM_CPUS, arm_instruction_record, arm_toolchain_status
    from facekd import table

    report, results = _run_cli_on_tiny_checkpoint(tmp_path, "--notes", "smoke preset: x")
    assert report["xnnpack"]["int8"] == {"partitions": 1, "ops": 22, "ops_outside": 0, "outside": {}}
    assert report["xnnpack"]["fp32"]["partitions"] == 1 and "DELEGATE" in report["xnnpack"]["method"]
    rows = table.read_table(results).set_index("stage")
    assert set(rows.index) == {"pruned", "int8"} and set(rows["runtime"]) == {"litert"}
    assert rows.loc["int8", "notes"] == "smoke preset: x; LiteRT XNNPACK: 1 partition(s), 0 op(s) outside"
    can_count, why = arm_toolchain_status(runtime="litert")
    out = capsys.readouterr().out
    for kind, stage in (("fp32", "pruned"), ("int8", "int8")):
        cells = [rows.loc[stage, f"arm_instr_{cpu.removeprefix('cortex-')}"] for cpu in ARM_CPUS]
        if not can_count:
            assert all(pd.isna(c) for c in cells) and f"emulated ARM instructions skipped: {why}" in out
            continue
        path = tmp_path / "litert" / f"model_{kind}.tflite"
        expected = [arm_instruction_record(path, cpu)["instructions"] for cpu in ARM_CPUS]  # cached by the run
        assert [int(c) for c in cells] == expected == [report["arm_instructions"][kind][c] for c in ARM_CPUS]


@needs_litert
def test_cli_unknown_target_is_refused_before_conversion(tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")  # never read: the refusal comes first
    with pytest.raises(SystemExit) as exc:
        litert_main([str(ckpt), "--target", "a99", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err.startswith("error: --target: unknown target 'a99'; choose from: a53, a72")
    assert not (tmp_path / "out").exists()


@needs_litert
@pytest.mark.slow
def test_best_forms_pick_the_cheapest_tflite_given_costs(tmp_path, monkeypatch):
    """With fixed costs the choice is checkable: the cheapest fp32 form; the cheapest int8 form among those within
    the cosine slack (an int8 form made inaccurate on purpose is passed over although cheapest)."""
    import quantize.litert as litert
    import quantize.target as target
    from quantize.litert import best_fp32, best_int8, op_histogram

    fake = {"prelu": 3.0, "maxmul": 2.0, "relu": 2.5, "twin": 9.0}
    monkeypatch.setattr(target, "costs", lambda paths, t, runs=100: [fake[p.stem] for p in paths])
    x = preprocess(load_calibration_images("synthfaces:tiny", 24, seed=0), PRE)
    model = TinyFaceNet().eval()
    info = best_fp32(model, tmp_path / "fp32.tflite", x[:4], "a72", log=lambda *_: None)
    assert info["form"] == "maxmul" and info["unit"] == "instructions" and max(info["max_abs_diff"].values()) < 1e-5
    assert info["costs"] == {"prelu": 3.0, "maxmul": 2.0, "relu": 2.5}
    assert op_histogram(tmp_path / "fp32.tflite").get("MAXIMUM") == 5
    spoil = litert.PRELU_FORMS["maxmul"]

    def spoiled(m):  # maxmul with every slope zeroed: still converts, but far from the float model
        out, counts = spoil(m)
        for buf in out.buffers():
            buf.zero_()
        return out, counts
    monkeypatch.setitem(litert.PRELU_FORMS, "maxmul", spoiled)
    q = best_int8(model, tmp_path / "int8.tflite", x, "a76", log=lambda *_: None)
    assert q["held_out_cosine"]["maxmul"] < min(q["held_out_cosine"]["relu"], q["held_out_cosine"]["twin"]) - 0.002
    assert q["form"] == "relu" and q["held_out_images"] == 6 and q["prelu"] == {"form": "relu", "rewritten": 5, "kept": 0}
    ops = op_histogram(tmp_path / "int8.tflite")
    assert ops["DELEGATE"] == 1 and ops["MUL"] == 5 and not {"MAXIMUM", "DEQUANTIZE", "QUANTIZE"} & set(ops)


@needs_litert
@pytest.mark.slow
def test_cli_target_x86_writes_target_rows(tmp_path, capsys):
    """--target x86: every form converted and timed here, the winners written; rows carry target and a -x86 run."""
    from facekd import table

    report, results = _run_cli_on_tiny_checkpoint(tmp_path, "--target", "x86", "--arm", "off")
    chosen = report["target"]
    assert chosen["name"] == "x86" and set(chosen["fp32"]["costs"]) == {"prelu", "maxmul", "relu"}
    assert set(chosen["int8"]["costs"]) == {"twin", "maxmul", "relu"} and chosen["int8"]["unit"] == "ms"
    assert report["prelu"]["form"] == chosen["int8"]["form"] == min(
        [f for f, c in chosen["int8"]["held_out_cosine"].items()
         if c >= max(chosen["int8"]["held_out_cosine"].values()) - 0.002], key=chosen["int8"]["costs"].get)
    rows = table.read_table(results)
    assert sorted(zip(rows["stage"], rows["run"], rows["target"], rows["runtime"])) == [
        ("int8", "t-litert-x86", "x86", "litert"), ("pruned", "t-litert-x86", "x86", "litert")]
    assert "forms chosen for x86: fp32 prelu" in capsys.readouterr().out
