"""quantize.target and the PReLU forms: exact fp32 forms (against the PyTorch module), the fully 8-bit Max(x, a*x)
int8 form, per-target choice of the cheapest form, the target/runtime columns of the int8 row."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from facekd.io import FacekdError
from quantize.calib import load_calibration_images, preprocess
from quantize.graph import FP32_FORMS, prelu_fp32_form
from quantize.ptq import cosine_rows, main as ptq_main, quantize_onnx, raw_embeddings
from test_quantize import PRE, TinyFaceNet, _export


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return load_calibration_images("synthfaces:tiny", 48, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _export(TinyFaceNet(), tmp_path_factory.mktemp("t") / "tiny.onnx")


@pytest.mark.parametrize("form", FP32_FORMS)
def test_fp32_forms_equal_the_pytorch_model(tmp_path, faces, form):
    model = TinyFaceNet("mixed").eval()  # slopes > 1, mixed around 1, one PReLU not after a conv
    src = _export(model, tmp_path / "mixed.onnx")
    proto, n = prelu_fp32_form(onnx.load(str(src)), form)
    ops = [node.op_type for node in proto.graph.node]
    if form in ("relu", "maxmul"):  # every constant-slope PRelu is spelled with fast elementwise kernels
        assert n == 6 and "PRelu" not in ops
    if form == "maxmul":  # all-<=1 layers Max, the all->1 layer Min, mixed layers fall back to the relu form
        assert ops.count("Max") == 2 and ops.count("Min") == 1 and ops.count("Relu") == 3
    path = tmp_path / f"{form}.onnx"
    onnx.save(proto, str(path))
    x = preprocess(faces[:8], PRE)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(raw_embeddings(path, x), want, rtol=1e-5, atol=1e-5)
    assert {p.key for p in proto.metadata_props} == {"facekd", "author"}
    with pytest.raises(ValueError, match="unknown PReLU form"):
        prelu_fp32_form(proto, "leaky")


def test_mulmax_int8_runs_prelu_on_8bit_tensors(tmp_path, tiny, faces):
    dst = tmp_path / "mulmax.onnx"
    info = quantize_onnx(tiny, dst, faces[:32], prelu="mulmax")
    proto = onnx.load(str(dst))
    ops = [n.op_type for n in proto.graph.node]
    assert info["prelu_form"] == "mulmax" and info["int8_max_fused"] == 5
    assert ops.count("QLinearMul") == 5 and ops.count("Max") == 5 and "PRelu" not in ops and "Mul" not in ops
    # one float boundary at each end, none inside: every Max reads a QLinearConv and a QLinearMul output
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type == "Max":
            assert sorted(producers[i].op_type for i in node.input) == ["QLinearConv", "QLinearMul"]
    x = preprocess(faces[32:], PRE)
    cos = cosine_rows(raw_embeddings(tiny, x), raw_embeddings(dst, x))
    assert cos.mean() > 0.98 and cos.min() > 0.95, cos
    with pytest.raises(FacekdError, match="mulmax needs --format qoperator"):
        quantize_onnx(tiny, tmp_path / "x.onnx", faces[:8], prelu="mulmax", fmt="qdq")


def test_best_forms_pick_the_cheapest_measured(tmp_path, tiny, faces, monkeypatch):
    import quantize.target as target

    x = preprocess(faces[:4], PRE)
    # fixed costs make the choice checkable; the measured path is exercised by the CLI test below
    fake = {"prelu": 3.0, "relu": 1.0, "maxmul": 2.0, "mulmax-u8": 5.0, "max-u8": 4.0, "mulmax-s8": 6.0}
    monkeypatch.setattr(target, "costs", lambda paths, t, runs=100: [fake[p.stem] for p in paths])
    info = target.best_fp32(tiny, tmp_path / "fp32.onnx", x, "a72", log=lambda *_: None)
    assert info["form"] == "relu" and info["unit"] == "instructions" and max(info["max_abs_diff"].values()) < 1e-5
    assert "Relu" in [n.op_type for n in onnx.load(str(tmp_path / "fp32.onnx")).graph.node]
    q = target.best_int8(tiny, tmp_path / "int8.onnx", faces[:24], "a76", log=lambda *_: None)
    cosine = q["target"]["held_out_cosine"]
    assert set(cosine) == set(target.INT8_CANDIDATES) and q["target"]["held_out_images"] == 6
    # the cheapest form among those within COSINE_SLACK of the best held-out cosine: max-u8 where the u8 forms keep
    # their fidelity (AVX512-VNNI); on AVX2-only CPUs onnxruntime's u8 kernels may lose it, and an s8 form must win
    allowed = [f for f in cosine if cosine[f] >= max(cosine.values()) - target.COSINE_SLACK]
    assert q["target"]["form"] == min(allowed, key=fake.get)
    assert q["prelu_form"] == q["target"]["form"].split("-")[0]
    with pytest.raises(FacekdError, match="unknown target 'a99'"):
        target.resolve_target("a99")


def test_inexact_fp32_form_is_refused(tmp_path, tiny, faces, monkeypatch):
    import quantize.target as target

    def broken(src, dst, form):  # a "form" that changes the slopes
        proto = onnx.load(str(src))
        for t in proto.graph.initializer:
            if len(t.dims) == 3 and t.dims[1:] == [1, 1]:
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 0 + 0.9, t.name))
        onnx.save(proto, str(dst))
    monkeypatch.setattr(target, "write_fp32_form", broken)
    with pytest.raises(FacekdError, match="fp32 PReLU form 'prelu' differs from the original"):
        target.best_fp32(tiny, tmp_path / "f.onnx", preprocess(faces[:4], PRE), "x86", log=lambda *_: None)


@pytest.mark.slow
def test_ptq_target_x86_end_to_end(tmp_path, tiny):
    out, results = tmp_path / "int8", tmp_path / "summary.csv"
    assert ptq_main([str(tiny), "--calib", "synthfaces:tiny", "--num-calib", "24", "--eval", "synthfaces:tiny",
                     "--runs", "5", "--no-profile", "--target", "x86", "--out", str(out), "--run", "r",
                     "--results", str(results)]) == 0
    report = json.loads((out / "fidelity.json").read_text())
    chosen = report["quantization"]["target"]
    assert chosen["name"] == "x86" and chosen["unit"] == "ms" and chosen["form"] in chosen["costs"]
    assert report["fp32_form"]["form"] in ("prelu", "relu", "maxmul")
    assert report["latency"]["fp32_timed"] == str(out / "model_fp32_best.onnx")
    from facekd.table import read_rows

    rows = read_rows(results)
    assert [(r["run"], r["target"], r["runtime"]) for r in rows] == [("r-x86", "x86", "onnxruntime")]


def test_cli_target_errors(tmp_path, tiny, capsys):
    for argv, msg in ((["--target", "a99"], "error: --target: unknown target 'a99'"),
                      (["--target", "x86", "--method", "auto"], "error: --target and --method auto"),
                      (["--format", "qdq"], "error: --prelu mulmax needs --format qoperator")):
        with pytest.raises(SystemExit) as exc:
            ptq_main([str(tiny), *argv, "--out", str(tmp_path)])
        assert exc.value.code == 2 and capsys.readouterr().err.startswith(msg)


def test_table_reads_files_written_before_target_and_runtime(tmp_path):
    from facekd import table

    old_cols = [c for c in table.COLUMNS if c not in table.ADDED_COLUMNS]
    path = tmp_path / "old.csv"
    path.write_text(",".join(old_cols) + "\n" + ",".join("int8" if c == "stage" else "m" if c in ("model", "run",
                                                          "dataset") else "" for c in old_cols) + "\n")
    assert table.read_rows(path)[0]["target"] == ""
    table.upsert_rows([{"stage": "int8", "model": "m", "run": "m", "dataset": "m", "target": "a72"}], path)
    assert path.read_text().splitlines()[0].split(",") == list(table.COLUMNS)
    assert table.read_rows(path)[0]["target"] == "a72"


@pytest.mark.arm
@pytest.mark.slow
def test_arm_target_counts_instructions_and_takes_the_cheapest(tmp_path, tiny, faces):
    from evaluate.latency import arm_instruction_record, arm_toolchain_status
    from quantize.target import best_int8

    ok, reason = arm_toolchain_status()
    if not ok:
        pytest.skip(reason)
    q = best_int8(tiny, tmp_path / "int8.onnx", faces[:24], "a72", candidates=("mulmax-u8", "max-u8"),
                  log=lambda *_: None)
    found = q["target"]["costs"]
    assert q["target"]["unit"] == "instructions" and q["target"]["form"] == min(found, key=found.get)
    assert arm_instruction_record(tmp_path / "int8.onnx", "cortex-a72")["instructions"] == found[q["target"]["form"]]


def test_target_cli_writes_the_fp32_form(tmp_path, tiny, capsys):
    from quantize.target import main as target_main

    assert target_main([str(tiny), "--out", str(tmp_path / "f.onnx"), "--form", "relu"]) == 0
    assert "Relu" in [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]
    with pytest.raises(SystemExit) as exc:
        target_main([str(tiny), "--out", str(tmp_path / "g.onnx"), "--form", "nope"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --form: unknown form 'nope'")


# ----------------------------------------------------------------------------------------------- quantize.bench --targets

def _row(target, runtime, ref, fp32, i8):
    return {"target": target, "runtime": runtime, "unit": "instructions", "fp32_reference": ref,
            "fp32_reference_form": "r", "fp32": fp32, "fp32_form": "f", "int8": i8, "int8_form": "q"}


def test_best_row_takes_each_cost_from_the_cheapest_runtime():
    from quantize.bench import best_row, with_ratios

    rows = [with_ratios(_row("a72", "onnxruntime", 116.7e6, 87.7e6, 72.6e6)),
            with_ratios(_row("a72", "litert", 90.0e6, 73.2e6, 80.0e6))]
    assert rows[0]["int8_over_reference_fp32"] == pytest.approx(72.6 / 116.7)  # 0.6221
    assert rows[1]["int8_over_own_fp32"] == pytest.approx(80.0 / 73.2) and rows[1]["int8_not_above_fp32"] is False
    assert rows[0]["goal"] == 0.60 and rows[0]["meets_goal"] is False
    best = best_row(rows)
    # cheapest int8 over runtimes (onnxruntime 72.6) over cheapest unpruned fp32 over runtimes (litert 90.0)
    assert best["int8_over_reference_fp32"] == pytest.approx(72.6 / 90.0)      # 0.8067: stricter than either runtime
    assert best["int8_over_own_fp32"] == pytest.approx(72.6 / 73.2)
    assert (best["int8_form"], best["fp32_reference_form"], best["fp32_form"]) == ("onnxruntime q", "litert r",
                                                                                   "litert f")
    assert best["int8_not_above_fp32"] is True and best["runtime"] == "best"
    a76 = best_row([with_ratios(_row("a76", "onnxruntime", 100.0, 80.0, 39.0))])
    assert a76["goal"] == 0.40 and a76["meets_goal"] is True
    assert with_ratios(_row("x86", "litert", 4.0, 3.0, 2.0))["goal"] is None


def test_target_table_retimes_host_winners_side_by_side(tmp_path, monkeypatch):
    """Rows per runtime and the best row, wired through fake candidates: each form's cost picks the winner (int8:
    within the cosine slack), then host ms come from one re-timing of all six winners, (ref, own, int8) per runtime."""
    from pathlib import Path

    import quantize.bench as bench
    import quantize.litert as litert
    import quantize.target as target

    def fake(ext, forms, cosine=None):
        def build(src, x, out_dir, *args, **kwargs):
            paths = {f: Path(out_dir) / f"{f}{ext}" for f in forms}
            for path in paths.values():
                path.write_bytes(path.name.encode())  # the content names the form, wherever it is copied
            return {"paths": paths, **({"cosine": cosine} if cosine else {})}
        return build
    monkeypatch.setattr(target, "fp32_candidates", fake(".onnx", ("prelu", "relu")))
    monkeypatch.setattr(target, "int8_candidates", fake(".onnx", ("mulmax-u8", "max-u8"),
                                                        {"mulmax-u8": 0.999, "max-u8": 0.9995}))
    monkeypatch.setattr(litert, "fp32_candidates", fake(".tflite", ("prelu", "maxmul")))
    monkeypatch.setattr(litert, "int8_candidates", fake(".tflite", ("twin", "maxmul"),
                                                        {"twin": 0.999, "maxmul": 0.99}))  # maxmul: too far
    per_form = {"prelu.onnx": 3, "relu.onnx": 2, "mulmax-u8.onnx": 1, "max-u8.onnx": 4,
                "prelu.tflite": 3, "maxmul.tflite": 1, "twin.tflite": 5}
    timed = []

    def fake_costs(paths, t, runs=100):
        names = [Path(p).read_bytes().decode() for p in paths]
        if len(paths) == 6:  # the side-by-side re-timing of the winners
            timed.append(names)
            return [10.0, 8.0, 5.0, 7.0, 6.0, 6.5]
        return [float(per_form[n]) for n in names]
    monkeypatch.setattr(target, "costs", fake_costs)

    class M:
        preprocessing = PRE
    images = load_calibration_images("synthfaces:tiny", 8, seed=0)
    onnx_path = _export(TinyFaceNet(), tmp_path / "m.onnx")
    rows = bench.target_table(onnx_path, onnx_path, (M(), M()), images, ["x86"], ["onnxruntime", "litert"],
                              log=lambda *_: None)
    assert timed == [["relu.onnx", "relu.onnx", "mulmax-u8.onnx", "maxmul.tflite", "maxmul.tflite", "twin.tflite"]]
    assert [(r["runtime"], r["fp32_reference"], r["fp32"], r["int8"]) for r in rows] == [
        ("onnxruntime", 10.0, 8.0, 5.0), ("litert", 7.0, 6.0, 6.5), ("best", 7.0, 6.0, 5.0)]
    assert rows[0]["forms"]["int8"] == {"mulmax-u8": 1.0, "max-u8": 4.0}
    assert rows[1]["int8_not_above_fp32"] is False and rows[2]["int8_over_reference_fp32"] == pytest.approx(5 / 7)
    assert rows[2]["int8_form"] == "onnxruntime mulmax-u8" and rows[2]["fp32_reference_form"] == "litert maxmul"
    text = bench.format_target_table(rows)
    assert "int8 <= same-model fp32 on every target, litert: NO (x86)" in text
    assert "int8 <= same-model fp32 on every target, onnxruntime: yes" in text


def test_bench_targets_bad_input(tmp_path, tiny, capsys):
    from quantize.bench import main as bench_main

    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")  # never read: every refusal comes first
    for argv, msg in (([str(tiny), "--targets", "a72,a99"], "error: --target: unknown target 'a99'"),
                      ([str(tiny), "--targets", "a72", "--runtimes", "tflite"],
                       "error: --runtimes: unknown runtime 'tflite'; choose from: onnxruntime, litert"),
                      ([str(tiny), "--runtimes", "litert"], "error: --runtimes needs --targets"),
                      ([str(ckpt), "--targets", "a72", "--reference", str(tmp_path / "none.onnx")],
                       "error: --reference not found"),
                      ([str(ckpt), "--targets", "a72", "--reference", str(tiny), "--runtimes", "onnxruntime,litert"],
                       "error: --runtimes litert: ")):
        with pytest.raises(SystemExit) as exc:
            bench_main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]  # importing litert_torch may log a torch warning first
        assert exc.value.code == 2 and err.startswith(msg), err


def test_bench_default_runtimes_skip_litert_for_onnx_models_in_one_line(tmp_path, tiny):
    from quantize.bench import resolve_runtimes
    from quantize.litert import litert_missing

    runtimes, why = resolve_runtimes(None, tiny, None)
    assert runtimes == ["onnxruntime"]
    assert why == (litert_missing() or "LiteRT converts from the PyTorch module: pass facekd checkpoints "
                                       f"(.safetensors), not {tiny}")
    assert resolve_runtimes("onnxruntime", tiny, None) == (["onnxruntime"], None)
