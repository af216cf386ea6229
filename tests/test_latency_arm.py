"""Emulated ARM cost: aarch64 instructions per inference under QEMU with the project's counting plugin.

Needs the toolchain (`python -m evaluate.latency --arm-setup`, or `.ci/arm-setup`); skipped with the reason when
it is absent. The CI tests of this path: a tiny conv net in onnxruntime, fp32 twice (repeatability) and int8 once,
on the A76; a tiny MobileFaceNet-like `.tflite` in LiteRT (skipped with the reason when the prefix has no aarch64
LiteRT), fp32 twice and int8 on the A53 and the A76.

The `.tflite` fixtures (tests/data/tiny_facenet_{fp32,int8}.tflite) are committed, so this test needs no litert
extra on the host; they are tests/test_quantize.py's TinyFaceNet() exported by quantize.litert.export_tflite (int8:
prelu_to_twin_conv, calibrated on the first 16 synthfaces:tiny images, seed 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluate import latency
from test_latency import TINY_TFLITE, tiny_onnx

_OK, _REASON = latency.arm_toolchain_status()
_LITERT_OK, _LITERT_REASON = latency.arm_toolchain_status(runtime="litert")

pytestmark = [pytest.mark.arm, pytest.mark.slow, pytest.mark.skipif(not _OK, reason=_REASON)]


def _int8(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self.batches = iter([{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(str(fp32), str(out), Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out


def test_instruction_count_repeatable_and_int8_cheaper_on_a76(tmp_path: Path) -> None:
    fp32 = tiny_onnx(tmp_path / "fp32.onnx", channels=(3, 16, 32), size=32)
    int8 = _int8(fp32, tmp_path / "int8.onnx")
    first = latency.arm_instruction_record(fp32, "cortex-a76", use_cache=False)
    again = latency.arm_instruction_record(fp32, "cortex-a76", use_cache=False)
    assert first["unit"] == "instructions" and first["cpu"] == "cortex-a76"
    assert first["instructions"] > 100_000  # two 3x3 convs on 32x32: millions of instructions, not the markers
    assert len(first["runs_instructions"]) == first["runs"] >= 3
    # two separate emulated processes count the same work to within 0.1%
    assert abs(again["instructions"] - first["instructions"]) <= 1e-3 * first["instructions"]
    quantized = latency.arm_instructions(int8, ["cortex-a76"], use_cache=False)
    # the A76 has the dot-product instructions onnxruntime's int8 kernels use: int8 must take fewer instructions
    assert 0 < quantized["cortex-a76"] < first["instructions"]
    # the cache returns the recorded count without emulating again
    cached = latency.arm_instruction_record(int8, "cortex-a76")
    assert cached["cached"] and cached["instructions"] == quantized["cortex-a76"]


@pytest.mark.skipif(not _LITERT_OK, reason=_LITERT_REASON)
def test_litert_instruction_count_repeatable_one_partition_per_core() -> None:
    first = latency.arm_instruction_record(TINY_TFLITE["fp32"], "cortex-a76", use_cache=False)
    again = latency.arm_instruction_record(TINY_TFLITE["fp32"], "cortex-a76", use_cache=False)
    assert first["runtime"] == "litert" and first["litert"] and "onnxruntime" not in first
    assert first["instructions"] > 100_000 and len(first["runs_instructions"]) == first["runs"] >= 3
    assert abs(again["instructions"] - first["instructions"]) <= 1e-3 * first["instructions"]
    # the aarch64 interpreter delegates the whole graph to XNNPACK, as the host's does
    assert first["xnnpack"] == {"partitions": 1, "ops": 32, "ops_outside": 0, "outside": {}}
    a53, a76 = (latency.arm_instruction_record(TINY_TFLITE["int8"], cpu, use_cache=False)
                for cpu in ("cortex-a53", "cortex-a76"))
    # XNNPACK picks its int8 kernels by core: the A76's dot-product kernels execute fewer instructions
    assert 0 < a76["instructions"] < a53["instructions"]
    assert a76["xnnpack"]["partitions"] == 1 and a76["xnnpack"]["ops_outside"] == 0
    cached = latency.arm_instruction_record(TINY_TFLITE["int8"], "cortex-a76")
    assert cached["cached"] and cached["instructions"] == a76["instructions"]
