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
    from facedata.formats import main as formats_main

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
