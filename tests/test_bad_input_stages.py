"""Bad input ends in one `error: ...` line and exit 2, before heavy work: data formats, stage commands, run locks.

Each test here failed on the behaviour issue 17 describes (a traceback, a MemoryError, a wrong count, a silent
restart, a stray file) and passes on the fixed one.
"""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from facekd.io import FacekdError
from facedata import formats
from facedata.datasets import make_loader, open_train_set


@pytest.fixture(scope="module")
def tiny_train():
    return open_train_set("synthfaces:tiny")


def _fails(main, argv, capsys) -> str:
    """Run a CLI expected to fail: exit 2 with exactly one stderr line `error: ...`; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) >= 1 and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


# ------------------------------------------------------------------------------------------------ data formats
def test_idx_missing_a_key_after_the_first_100000_is_one_line(tmp_path, tiny_train):
    # the old check looked at the first 100,000 keys only; the label scan then died on a bare KeyError
    n = 100_002
    image = formats.pack_record(0.0, formats.encode_image(np.asarray(tiny_train.images[0]), "png"), idx=1)
    header = formats._frame(formats.pack_record([n + 1, n + 2], b""))
    (tmp_path / "train.rec").write_bytes(header + formats._frame(image))
    lines = ["0\t0"] + [f"{k}\t{len(header)}" for k in range(1, n)]  # key n missing
    (tmp_path / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(FacekdError, match=rf"train.idx: header says images 1..{n} but 1 key\(s\) are missing from "
                                          rf"the index, e\.g\. \[{n}\]"):
        open_train_set(str(tmp_path))


class _Huge:
    def __reduce__(self):
        return bytearray, (1 << 44,)


@pytest.mark.parametrize("payload", [
    pickle.dumps(([_Huge()], []), protocol=2),                           # bytearray(16 TiB) from a 50-byte file
    b"\x80\x04\x8e" + struct.pack("<Q", 1 << 44) + b"x" * 16 + b".",     # BINBYTES8 claiming 16 TiB
], ids=["bytearray-n", "bytes8-length"])
def test_bin_cannot_ask_for_more_memory_than_it_holds(tmp_path, payload):
    path = tmp_path / "evil.bin"
    path.write_bytes(payload)
    with pytest.raises(FacekdError, match=r"evil.bin: unsafe or malformed pickle"):
        formats.load_bin_pickle(path)


def test_rec_cut_in_half_counts_against_all_its_images(tmp_path, tiny_train, capsys):
    out = formats.write_recordio(tmp_path / "r", tiny_train.images, tiny_train.labels, image_format="png")
    raw = (out / "train.rec").read_bytes()
    (out / "train.rec").write_bytes(raw[:len(raw) // 2])
    ds = open_train_set(str(out), max_bad_fraction=0.6)       # 32 of 64 records lost: 0.5, under the limit
    assert (ds.total, len(ds), len(ds.bad_files)) == (64, 32, 32)
    with pytest.raises(FacekdError, match=r": 32 unreadable images of 64 exceed max_bad_fraction=0.4 "):
        open_train_set(str(out), max_bad_fraction=0.4)
    from facedata.datasets import main as formats_main

    assert "32 unreadable images of 64" in _fails(formats_main, [str(out)], capsys)


def test_bad_image_limit_holds_across_dataloader_workers(tmp_path, tiny_train):
    # 4 bad images of 64 with max_bad_fraction 3/64: two workers each saw 2 (under 3), together 4 (over 3)
    root = formats.write_folder(tmp_path / "f", tiny_train.images, tiny_train.labels)
    ds = open_train_set(str(root), max_bad_fraction=3 / 64)
    for i in (0, 9, 16, 25):  # batches of 8: worker 0 reads batches 0, 2; worker 1 batches 1, 3
        ds.paths[i].write_bytes(b"broken")
    with pytest.raises(FacekdError, match=r"unreadable images of 64 exceed max_bad_fraction=0.046875, this "
                                          r"DataLoader worker's 1/2 share"):
        for _ in make_loader(ds, 8, workers=2, shuffle=False):
            pass


# ------------------------------------------------------------------------------------------------ stage commands
class _Stop(Exception):
    """Raised by a stand-in data opener: the command got as far as reading data."""


@pytest.fixture
def no_data(monkeypatch):
    """Record every data spec a command opens, and stop it there (nothing is generated or read)."""
    import facedata

    opened: list[tuple[str, str]] = []

    def opener(kind):
        def open_(spec, **_):
            opened.append((kind, str(spec)))
            raise _Stop(f"{kind} {spec}")
        return open_

    monkeypatch.setattr(facedata, "open_train_set", opener("train"))
    monkeypatch.setattr(facedata, "open_verification_set", opener("val"))
    return opened


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from facekd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("runs") / "demo" / "student"
    save_checkpoint(create_model("mobilefacenet"), d / "model.safetensors")
    return d


def test_prune_refuses_an_unreadable_student_training_state(student_dir, tmp_path, capsys):
    from prune.run import main

    (student_dir / "checkpoint.pt").write_bytes(b"not a torch file")
    try:
        line = _fails(main, [str(student_dir), "--ratio", "0.2", "--finetune-steps", "1", "--data", "synthfaces:tiny",
                             "--val", "--kd", "none", "--latency-runs", "0", "--out", str(tmp_path / "p"),
                             "--results", "none"], capsys)
    finally:
        (student_dir / "checkpoint.pt").unlink()
    assert line.startswith(f"error: cannot read the student's training state {student_dir / 'checkpoint.pt'} (")
    assert "move it away" in line


@pytest.mark.parametrize("target, message", [
    ("500M", "error: --target-macs 500.0M is not below the student's 22"),
    ("abc", "error: --target-macs: cannot read 'abc'"),
])
def test_prune_target_macs_refused_before_any_data(student_dir, tmp_path, capsys, no_data, target, message):
    from prune.run import main

    line = _fails(main, [str(student_dir), "--target-macs", target, "--data", "synthfaces:tiny",
                         "--out", str(tmp_path / "p")], capsys)
    assert line.startswith(message) and no_data == []


def test_prune_preset_accepts_only_known_presets(student_dir, capsys):
    from prune.run import main

    with pytest.raises(SystemExit) as e:
        main([str(student_dir), "--ratio", "0.2", "--preset", "quick"])
    assert e.value.code == 2 and "argument --preset: invalid choice: 'quick'" in capsys.readouterr().err


def test_training_flags_refused_before_any_data(capsys, no_data, tmp_path):
    from distill.run import main as distill_main
    from teachers.train import main as train_main

    assert _fails(distill_main, ["--teacher", "r18", "--kd", "none", "--steps", "0"], capsys) == \
        "error: steps must be >= 1, got 0"
    assert _fails(train_main, ["--arch", "r18", "--lr", "-1", "--out", str(tmp_path)], capsys) == \
        "error: lr must be > 0, got -1.0"
    assert no_data == []


def test_smoke_preset_means_tiny_data_in_every_stage(student_dir, tmp_path, no_data):
    import teachers.cache
    from distill.run import main as distill_main
    from prune.run import main as prune_main
    from quantize.ptq import main as ptq_main
    from teachers.train import main as train_main

    for main, argv in [(distill_main, ["--teacher", "r18", "--kd", "none"]),
                       (train_main, ["--arch", "r18", "--out", str(tmp_path / "t")]),
                       (teachers.cache.main, ["--teacher", "r18"]),
                       (prune_main, [str(student_dir), "--ratio", "0.2", "--out", str(tmp_path / "p")])]:
        with pytest.raises(_Stop):
            main([*argv, "--preset", "smoke"])
    assert [spec for _, spec in no_data] == ["synthfaces:tiny"] * 4
    onnx_path = tmp_path / "m.onnx"
    from facekd.models import create_model, export_onnx

    export_onnx(create_model("mobilefacenet").eval(), onnx_path)
    with pytest.raises(_Stop):  # the fidelity set first, then the calibration images
        ptq_main([str(onnx_path), "--preset", "smoke", "--out", str(tmp_path / "q")])
    assert no_data[-1] == ("val", "synthfaces:tiny")
    with pytest.raises(_Stop):  # --data wins over the preset
        distill_main(["--teacher", "r18", "--kd", "none", "--preset", "smoke", "--data", "synthfaces:small"])
    assert no_data[-1] == ("train", "synthfaces:small")


def test_prune_defaults_follow_the_students_recipe(student_dir, tmp_path, no_data):
    from facekd.io import write_manifest
    from prune.run import main

    write_manifest(student_dir, "student", {"kd": "none", "data": "synthfaces:small", "val": ["synthfaces:tiny"]})
    try:
        with pytest.raises(_Stop):
            main([str(student_dir), "--ratio", "0.2", "--preset", "cpu", "--out", str(tmp_path / "a")])
        assert no_data == [("train", "synthfaces:small")]
        no_data.clear()
        with pytest.raises(_Stop):  # --data given: its own SynthFaces verification set
            main([str(student_dir), "--ratio", "0.2", "--finetune-steps", "0", "--data", "synthfaces:tiny",
                  "--out", str(tmp_path / "b")])
        assert no_data == [("val", "synthfaces:tiny")]
        no_data.clear()
        with pytest.raises(_Stop):  # no fine-tune: only the recipe's verification set is read
            main([str(student_dir), "--ratio", "0.2", "--finetune-steps", "0", "--out", str(tmp_path / "c")])
        assert no_data == [("val", "synthfaces:tiny")]
    finally:
        (student_dir / "manifest.json").unlink()


def test_nan_stop_names_no_checkpoint_that_does_not_exist(tmp_path, capsys):
    from teachers.train import main

    out = tmp_path / "t"
    line = _fails(main, ["--arch", "mobilefacenet", "--data", "synthfaces:tiny", "--val", "--preset", "smoke",
                         "--lr", "1e30", "--steps", "5", "--batch-size", "8", "--workers", "0", "--out", str(out),
                         "--no-results"], capsys)
    assert line.startswith("error: non-finite loss at step ") and not (out / "checkpoint.pt").exists()
    assert line.endswith("lower the learning rate or check the data; no checkpoint was saved before it")


def test_quantizing_an_int8_model_is_refused_and_leaves_no_files(tmp_path, monkeypatch, capsys):
    from quantize.ptq import main, quantize_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 4), torch.nn.BatchNorm2d(8), torch.nn.PReLU(8),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(fp32), input_names=["x"], dynamic_axes={"x": {0: "b"}},
                      dynamo=False)
    images = np.random.default_rng(0).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    np.save(tmp_path / "calib.npy", images)
    quantize_onnx(fp32, int8, images)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    line = _fails(main, [str(int8), "--calib", str(tmp_path / "calib.npy"), "--num-calib", "8", "--eval", "none",
                         "--out", str(tmp_path / "again")], capsys)
    assert line == (f"error: {int8} is already quantised (DequantizeLinear, QLinearConv, QuantizeLinear); quantise its float model "
                    "(the pruned or student model.onnx / model.safetensors) instead")
    with pytest.raises(FacekdError, match="is already quantised"):
        quantize_onnx(int8, tmp_path / "int8_again.onnx", images)
    quantize_onnx(fp32, tmp_path / "int8_b.onnx", images)  # a float model: onnxruntime's helper files stay in tmp
    assert list(cwd.iterdir()) == []


def test_a_run_directory_in_use_is_refused(student_dir, tmp_path, capsys):
    from filelock import FileLock

    from distill.run import main as distill_main
    from prune.run import main as prune_main

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    with FileLock(str(run / "student" / ".lock")):  # held through another file descriptor, as by another process
        line = _fails(distill_main, ["--teacher", "r18", "--kd", "none", "--data", "synthfaces:tiny", "--val",
                                     "--preset", "smoke", "--steps", "2", "--batch-size", "8", "--workers", "0",
                                     "--out", str(run), "--resume", "--no-results"], capsys)
    assert line.startswith(f"error: {run / 'student'} is in use by another process")
    out = tmp_path / "pruned"
    out.mkdir()
    with FileLock(str(out / ".lock")):
        line = _fails(prune_main, [str(student_dir), "--ratio", "0.2", "--finetune-steps", "0", "--val",
                                   "--latency-runs", "0", "--out", str(out), "--resume", "--results", "none"], capsys)
    assert line.startswith(f"error: {out} is in use by another process")


def test_distill_help_explains_steps_and_feature_metric(capsys):
    from distill.run import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--steps STEPS training steps (optimiser updates) of each student" in text
    assert "--feature-metric {cosine,mse} feature KD distance: 1 - cosine, or mean squared error" in text


def test_smoke_rows_go_to_their_own_table_marked_as_smoke(monkeypatch, tmp_path):
    from engine.presets import SMOKE_NOTE, preset_notes, results_path
    from facekd import table

    monkeypatch.setattr(table, "DEFAULT_PATH", tmp_path / "results" / "summary.csv")
    assert results_path("smoke") == tmp_path / "results" / "smoke" / "summary.csv"
    assert results_path("cpu") == tmp_path / "results" / "summary.csv"
    assert results_path("smoke", "mine.csv") == tmp_path.__class__("mine.csv")
    assert preset_notes("smoke") == SMOKE_NOTE and preset_notes("cpu") == ""
    # a table written before the notes column existed still reads, its rows with empty notes
    old = tmp_path / "old.csv"
    header = [c for c in table.COLUMNS if c != "notes"]
    cells = {"stage": "student", "model": "m", "run": "r", "dataset": "synthfaces", "accuracy": "0.5"}
    old.write_text(",".join(header) + "\n" + ",".join(cells.get(c, "") for c in header) + "\n")
    [row] = table.read_rows(old)
    assert row["notes"] == "" and row["accuracy"] == "0.5"
