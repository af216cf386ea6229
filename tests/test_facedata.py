"""facedata: SynthFaces determinism and splits, real-format round trips, safe .bin loading, bad-image policy,
transforms and loading."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from facekd.io import FacekdError
from facedata import formats, synthfaces
from facedata.datasets import make_loader, open_train_set, open_verification_set
from facedata.formats import VerificationSet
from facedata.transforms import (ARCFACE_TEMPLATE, INSIGHTFACE_PREPROCESSING, align_face, estimate_similarity, hflip,
                                 normalize)

TINY = synthfaces.settings_for("tiny")


@pytest.fixture(scope="module")
def tiny_train():
    return open_train_set("synthfaces:tiny")


@pytest.fixture(scope="module")
def tiny_val():
    return open_verification_set("synthfaces:tiny")


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO(); Image.fromarray(img).save(buf, format="PNG"); return buf.getvalue()


def _jpg(img: np.ndarray, q: int = 95) -> bytes:
    buf = io.BytesIO(); Image.fromarray(img).save(buf, format="JPEG", quality=q); return buf.getvalue()


def _head(vs: VerificationSet, pairs: int) -> VerificationSet:
    return VerificationSet(vs.name, vs.images[:2 * pairs], vs.issame[:pairs], vs.identities[:2 * pairs], nfolds=1)


# ------------------------------------------------------------------------------------------------ SynthFaces
def test_same_seed_same_bytes_and_seed_matters(tmp_path, tiny_train):
    again = synthfaces.load_split(TINY, "train", cache_dir=tmp_path / "other")   # fresh render, other cache
    assert hashlib.sha256(np.asarray(again["images"]).tobytes()).hexdigest() == \
        hashlib.sha256(np.asarray(tiny_train.images).tobytes()).hexdigest()
    assert np.array_equal(again["labels"], tiny_train.labels)
    one = synthfaces.render_image(TINY, "train", 3, 1)
    assert np.array_equal(one, tiny_train.images[3 * TINY.images_per_id + 1])  # independent of batch/worker
    other_seed = synthfaces.render_image(dataclasses.replace(TINY, seed=1), "train", 3, 1)
    assert np.abs(one.astype(int) - other_seed).mean() > 10


def test_cache_key_tracks_version_and_settings(monkeypatch):
    key = synthfaces.cache_key(TINY)
    assert synthfaces.cache_key(dataclasses.replace(TINY, nuisance=0.5)) != key
    fp = synthfaces.dataset_fingerprint(TINY, "train")
    monkeypatch.setattr(synthfaces, "SYNTHFACES_VERSION", "999")
    assert synthfaces.cache_key(TINY) != key and synthfaces.dataset_fingerprint(TINY, "train") != fp


def test_splits_identity_disjoint_pairs_and_folds(tiny_train, tiny_val):
    s = TINY
    train_genes = np.stack([synthfaces.identity_genes(s, "train", i) for i in range(s.train_ids)])
    val_genes = np.stack([synthfaces.identity_genes(s, "val", i) for i in range(s.val_ids)])
    # no verification identity is a training identity (distinct gene vectors, far apart)
    d = np.abs(val_genes[:, None] - train_genes[None]).max(-1)
    assert d.min() > 0.05
    assert tiny_train.num_classes == s.train_ids and len(tiny_train) == s.train_ids * s.images_per_id
    ids, same = tiny_val.identities.reshape(-1, 2), tiny_val.issame
    assert len(same) == s.pairs and same.sum() == s.pairs // 2
    assert np.all((ids[:, 0] == ids[:, 1]) == same)
    impostor = ids[~same]
    within = (impostor[:, 0] // s.cluster_size) == (impostor[:, 1] // s.cluster_size)
    assert abs(within.mean() - s.within_cluster_impostors) < 0.2      # near-twin impostors are present
    folds = np.array_split(ids, s.folds)                               # consecutive pairs -> identity-disjoint folds
    sets = [set(f.ravel().tolist()) for f in folds]
    assert all(not (sets[a] & sets[b]) for a in range(len(sets)) for b in range(a))
    # siblings look alike more than strangers do
    sib = np.abs(train_genes[0] - train_genes[1]).mean()
    stranger = np.abs(train_genes[0] - train_genes[s.cluster_size]).mean()
    assert sib < 0.6 * stranger


def test_framing_follows_arcface_template():
    # clean (no nuisance) faces: the iris/pupil makes the eye template points darker than the cheeks below them
    s = dataclasses.replace(TINY, nuisance=0.0)
    imgs = np.stack([synthfaces.render_image(s, "train", i, 0) for i in range(8)]).astype(float).mean(-1)
    for (x, y) in ARCFACE_TEMPLATE[:2]:
        eye = imgs[:, int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].mean()
        cheek = imgs[:, int(y) + 14:int(y) + 17, int(x) - 1:int(x) + 2].mean()
        assert eye < cheek - 30


# --------------------------------------------------------------------------------------------- round trips
def test_folder_round_trip_png_exact(tmp_path, tiny_train):
    out = formats.write_folder(tmp_path / "f", tiny_train.images, tiny_train.labels, image_format="png")
    ds = open_train_set(str(out))
    assert ds.num_classes == tiny_train.num_classes and np.array_equal(ds.labels, tiny_train.labels)
    for i in (0, 17, len(ds) - 1):
        img, label, idx = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 112, 112) and (label, idx) == (int(tiny_train.labels[i]), i)
        assert torch.equal(img, tiny_train[i][0])
    assert ds.fingerprint == open_train_set(str(out)).fingerprint
    os.utime(ds.paths[0], ns=(1, 1))
    assert open_train_set(str(out)).fingerprint != ds.fingerprint     # a touched file changes the fingerprint


@pytest.mark.parametrize("image_format,tol", [("png", 0.0), ("jpg", 4.0)])
def test_recordio_round_trip(tmp_path, tiny_train, image_format, tol):
    out = formats.write_recordio(tmp_path / "r", tiny_train.images, tiny_train.labels, image_format=image_format)
    ds = open_train_set(str(out))
    assert np.array_equal(ds.labels, tiny_train.labels) and ds.num_classes == tiny_train.num_classes
    got = np.stack([ds.image(i) for i in range(len(ds))]).astype(float)
    assert np.abs(got - tiny_train.images).mean() <= tol
    assert open_train_set(str(out / "train.rec")).fingerprint == ds.fingerprint


def _independent_rec(path_rec, path_idx, records: dict[int, bytes]) -> None:
    """A RecordIO writer written from dmlc-core's RecordIOWriter::WriteRecord, separately from facedata."""
    kmagic = 0xCED7230A
    with open(path_rec, "wb") as rec, open(path_idx, "w") as idx:
        for key, buf in records.items():
            idx.write(f"{key}\t{rec.tell()}\n")
            n, dptr = len(buf), 0
            for i in range(0, (n >> 2) << 2, 4):
                if struct.unpack_from("<I", buf, i)[0] == kmagic:
                    rec.write(struct.pack("<II", kmagic, ((1 if dptr == 0 else 2) << 29) | (i - dptr)))
                    rec.write(buf[dptr:i])
                    dptr = i + 4
            rec.write(struct.pack("<II", kmagic, ((3 if dptr else 0) << 29) | (n - dptr)))
            rec.write(buf[dptr:])
            rec.write(b"\x00" * ((((n + 3) >> 2) << 2) - n))


def _mx_pack(label, payload: bytes, id_=0) -> bytes:
    """mxnet.recordio.pack: IRHeader 'IfQQ'; an array label sets flag = label.size and precedes the payload."""
    if np.ndim(label) == 0:
        return struct.pack("IfQQ", 0, float(label), id_, 0) + payload
    arr = np.asarray(label, np.float32)
    return struct.pack("IfQQ", arr.size, 0.0, id_, 0) + arr.tobytes() + payload


def test_recordio_reads_independently_written_file(tmp_path, tiny_train):
    images, labels = tiny_train.images[:12], tiny_train.labels[:12]
    n, classes = len(labels), int(labels.max()) + 1
    records = {0: _mx_pack([n + 1, n + 1 + classes], b"")}
    for k in range(n):
        payload = _png(np.asarray(images[k]))
        lab = [float(labels[k]), 0.0] if k % 3 == 1 else float(labels[k])   # both label layouts
        rec = _mx_pack(lab, payload, k + 1)
        if k == 4:  # the magic number inside a record at an aligned offset: dmlc splits it into parts
            rec += b"\x00" * ((-len(rec)) % 4) + struct.pack("<I", 0xCED7230A) + b"tail"
        records[k + 1] = rec
    for c in range(classes):
        records[n + 1 + c] = _mx_pack([1.0, 2.0], b"")
    d = tmp_path / "mx"; d.mkdir()
    _independent_rec(d / "train.rec", d / "train.idx", records)
    raw = (d / "train.rec").read_bytes()
    assert any((struct.unpack_from("<I", raw, o + 4)[0] >> 29) == 1 for o in range(0, len(raw) - 8, 4)
               if struct.unpack_from("<I", raw, o)[0] == 0xCED7230A)  # the split record really is in the file
    ds = open_train_set(str(d))
    assert len(ds) == n and np.array_equal(ds.labels, labels)
    for k in range(n):
        assert np.array_equal(ds.image(k), images[k])


def test_recordio_without_header_and_bad_idx(tmp_path, tiny_train):
    d = tmp_path / "nohdr"; d.mkdir()
    _independent_rec(d / "train.rec", d / "train.idx",
                     {k: _mx_pack(float(tiny_train.labels[k]), _png(np.asarray(tiny_train.images[k]))) for k in range(3)})
    ds = open_train_set(str(d))                       # flag == 0 on record 0: every key is an image
    assert len(ds) == 3 and np.array_equal(ds.image(2), tiny_train.images[2])
    (d / "train.idx").write_text("0 12 nonsense\n")
    with pytest.raises(FacekdError, match="index<TAB>offset"):
        open_train_set(str(d))
    with pytest.raises(FacekdError, match="not found"):
        open_train_set(str(tmp_path / "missing.rec"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("numpy_bools", [False, True])
def test_bin_written_like_insightface(tmp_path, tiny_val, protocol, numpy_bools):
    tiny_val = _head(tiny_val, 12)
    bins = [_jpg(img) for img in tiny_val.images]
    issame = [np.bool_(s) for s in tiny_val.issame] if numpy_bools else [bool(s) for s in tiny_val.issame]
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=protocol)   # exactly what insightface's tools do
    vs = open_verification_set(str(path))
    assert vs.name == "lfw" and np.array_equal(vs.issame, tiny_val.issame)
    assert np.abs(vs.images.astype(float) - tiny_val.images).mean() < 4.0


def test_bin_from_python2_pickle(tmp_path, tiny_val):
    """insightface's published .bin files were pickled by Python 2: images are str (BINSTRING), issame bools."""
    imgs = [_png(np.asarray(img)) for img in tiny_val.images[:4]]
    blob = b"\x80\x02]q\x00(" + b"".join(b"T" + struct.pack("<I", len(b)) + b for b in imgs) + b"e"
    blob += b"]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in tiny_val.issame[:2]) + b"e\x86q\x02."
    (tmp_path / "py2.bin").write_bytes(blob)
    vs = open_verification_set(str(tmp_path / "py2.bin"))
    assert np.array_equal(vs.images, tiny_val.images[:4]) and np.array_equal(vs.issame, tiny_val.issame[:2])


def test_bin_writer_round_trip_and_count_check(tmp_path, tiny_val):
    tiny_val = _head(tiny_val, 12)
    path = formats.write_bin(tmp_path / "sf.bin", tiny_val, image_format="png")
    vs = open_verification_set(str(path))
    assert np.array_equal(vs.images, tiny_val.images) and np.array_equal(vs.issame, tiny_val.issame)
    with open(tmp_path / "odd.bin", "wb") as f:
        pickle.dump(([_png(tiny_val.images[0])] * 3, [True]), f)
    with pytest.raises(FacekdError, match="3 images for 1 pairs"):
        open_verification_set(str(tmp_path / "odd.bin"))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_bin_refuses_malicious_pickle(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump(([b"\xff\xd8"], [_Evil(target)]), f, protocol=2)
    with pytest.raises(FacekdError, match=r"refused global (posix|os|nt)\.system"):
        open_verification_set(str(path))
    assert not target.exists()
    with open(path, "wb") as f:   # a numpy global other than the boolean scalar is refused too
        pickle.dump(([b"x", b"y"], np.array([True])), f)
    with pytest.raises(FacekdError, match="refused"):
        open_verification_set(str(path))


def test_lfw_round_trip_and_format(tmp_path, tiny_val):
    out = formats.write_lfw(tmp_path / "lfw", tiny_val, image_format="png")
    lines = (out / "pairs.txt").read_text().splitlines()
    assert lines[0] == f"{TINY.folds} {TINY.pairs // (2 * TINY.folds)}"
    assert len(lines[1].split()) == 3 and all(len(ln.split()) in (3, 4) for ln in lines[1:])
    name, i = lines[1].split()[:2]
    assert (out / name / f"{name}_{int(i):04d}.png").is_file()
    vs = open_verification_set(str(out))
    assert np.array_equal(vs.images, tiny_val.images) and np.array_equal(vs.issame, tiny_val.issame)
    assert vs.nfolds == TINY.folds


def test_synthfaces_cli_writes_each_format(tmp_path):
    for fmt in ("folder", "recordio", "bin", "lfw"):
        out = tmp_path / (f"{fmt}.bin" if fmt == "bin" else fmt)
        assert synthfaces.main(["--size", "tiny", "--write-format", fmt, "--out", str(out)]) == 0
    assert len(open_train_set(str(tmp_path / "folder"))) == len(open_train_set(str(tmp_path / "recordio")))
    assert open_verification_set(str(tmp_path / "bin.bin")).pairs == open_verification_set(str(tmp_path / "lfw")).pairs
    with pytest.raises(SystemExit) as e:
        synthfaces.main(["--size", "huge", "--bench"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ bad images
def test_corrupt_images_substituted_then_threshold_names_files(tmp_path, tiny_train, caplog):
    root = formats.write_folder(tmp_path / "f", tiny_train.images, tiny_train.labels)
    ds = open_train_set(str(root))
    bad = [ds.paths[1], ds.paths[9], ds.paths[30]]
    bad[0].write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="facedata"):
        ds = open_train_set(str(root), max_bad_fraction=2 / 64)
        img, label, idx = ds[1]
    assert (label, idx) == (int(tiny_train.labels[1]), 1)
    assert torch.equal(img, tiny_train[2][0])                 # the next image of the same identity
    assert list(ds.bad_files) == [1] and "not an image" not in ds.bad_files[1] and str(bad[0]) in ds.bad_files[1]
    assert str(bad[0]) in caplog.text
    bad[1].write_bytes(b"")                                    # empty: counted on open
    bad[2].write_bytes(_png(np.asarray(tiny_train.images[30]))[:60])   # truncated
    ds = open_train_set(str(root), max_bad_fraction=2 / 64)
    assert list(ds.bad_files) == [9]
    ds[1]
    with pytest.raises(FacekdError, match=r"3 unreadable images of 64 exceed max_bad_fraction") as e:
        ds[30]
    assert str(bad[0]) in str(e.value) and str(bad[1]) in str(e.value)
    with pytest.raises(FacekdError, match="unreadable images"):  # default threshold 0.001: one bad file is too many
        open_train_set(str(root))


def test_corrupt_verification_image_is_an_error(tmp_path, tiny_val):
    tiny_val = _head(tiny_val, 6)
    bins = [_png(img) for img in tiny_val.images]
    bins[5] = b"garbage"
    with open(tmp_path / "bad.bin", "wb") as f:
        pickle.dump((bins, list(tiny_val.issame)), f)
    with pytest.raises(FacekdError, match=r"1 unreadable image.*bad.bin\[5\]"):
        open_verification_set(str(tmp_path / "bad.bin"))


def test_other_sizes_are_resized(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for who in ("a", "b"):
        (tmp_path / who).mkdir()
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (250, 250, 3), dtype=np.uint8)).save(tmp_path / who / f"{k}.jpg")
    with caplog.at_level(logging.WARNING, logger="facedata"):
        ds = open_train_set(str(tmp_path))
        shapes = {tuple(ds[i][0].shape) for i in range(4)}
    assert shapes == {(3, 112, 112)} and caplog.text.count("resizing to 112x112") == 1


def test_unknown_specs_are_clear_errors(tmp_path):
    with pytest.raises(FacekdError, match="unknown SynthFaces size"):
        open_train_set("synthfaces:huge")
    with pytest.raises(FacekdError, match="not found"):
        open_verification_set(str(tmp_path / "nope.bin"))
    with pytest.raises(FacekdError, match="no pairs.txt|not 'synthfaces"):
        open_verification_set(str(tmp_path))


# ----------------------------------------------------------------------------------------------- transforms
def test_normalize_insightface_bgr_and_crop():
    x = torch.arange(3 * 112 * 112, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 3, 112, 112)
    y = normalize(x)
    assert torch.allclose(y, (x.float() / 255 - 0.5) / 0.5, atol=1e-6)
    bgr = normalize(x, {**INSIGHTFACE_PREPROCESSING, "channel_order": "BGR", "mean": [0, 10, 20], "std": [1, 2, 4]})
    assert torch.allclose(bgr[:, 0], x[:, 2].float() / 1) and torch.allclose(bgr[:, 2], (x[:, 0].float() - 20) / 4)
    narrow = normalize(x, {**INSIGHTFACE_PREPROCESSING, "input_size": [112, 96]})
    assert narrow.shape == (1, 3, 112, 96) and torch.allclose(narrow, y[..., 8:104])
    small = normalize(x, {**INSIGHTFACE_PREPROCESSING, "input_size": [56, 56]})
    assert small.shape == (1, 3, 56, 56)
    assert torch.allclose(small, torch.nn.functional.avg_pool2d(y, 2), atol=1e-5)  # bilinear 2x = 2x2 mean
    with pytest.raises(FacekdError, match="channel_order"):
        normalize(x, {**INSIGHTFACE_PREPROCESSING, "channel_order": "GRB"})


def test_hflip_tensor_and_numpy(tiny_val):
    nhwc = tiny_val.images[:2]
    assert np.array_equal(hflip(nhwc)[:, :, 0], nhwc[:, :, -1])
    nchw = torch.from_numpy(nhwc.copy()).permute(0, 3, 1, 2)
    assert torch.equal(hflip(nchw), torch.from_numpy(hflip(nhwc)).permute(0, 3, 1, 2))


def test_align_face_maps_moved_landmarks_onto_template():
    # a raw 240x200 "photo" with dots at the template points moved by a known similarity
    ang, s, t = np.radians(17.0), 1.4, np.array([33.0, 21.0])
    R = s * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    moved = ARCFACE_TEMPLATE @ R.T + t
    yy, xx = np.mgrid[0:240, 0:200]
    raw = np.zeros((240, 200, 3), np.uint8)
    for x, y in moved:
        raw[(xx - x) ** 2 + (yy - y) ** 2 <= 9.0] = 255
    M = estimate_similarity(moved, ARCFACE_TEMPLATE)
    assert np.allclose(M[:, :2], np.linalg.inv(R), atol=1e-9)
    out = align_face(raw, moved).astype(float)[..., 0]
    for x, y in ARCFACE_TEMPLATE:
        ys, xs = np.mgrid[int(y) - 5:int(y) + 6, int(x) - 5:int(x) + 6]
        w = out[ys, xs]
        cx, cy = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
        assert np.hypot(cx - x, cy - y) < 1.0
    with pytest.raises(FacekdError, match="landmarks"):
        align_face(raw, moved[:, :1])


# --------------------------------------------------------------------------------------------------- loading
def test_make_loader_batches_and_seed(tiny_train):
    a = [b[2].tolist() for b in make_loader(tiny_train, 16, workers=0, seed=3)]
    b = [b[2].tolist() for b in make_loader(tiny_train, 16, workers=0, seed=3)]
    c = [b[2].tolist() for b in make_loader(tiny_train, 16, workers=0, seed=4)]
    assert a == b and a != c and len(a) == len(tiny_train) // 16
    images, labels, idx = next(iter(make_loader(tiny_train, 8, workers=1, shuffle=False)))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 112, 112) and labels.dtype == torch.int64
    assert torch.equal(images[3], tiny_train[3][0]) and idx.tolist() == list(range(8))


def test_make_loader_distributed_shards(tiny_train, tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = make_loader(tiny_train, 8, workers=0, seed=1, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        e0 = [b[2].tolist() for b in loader]
        loader.sampler.set_epoch(1)
        e1 = [b[2].tolist() for b in loader]
        assert sorted(sum(e0, [])) == list(range(len(tiny_train))) and e0 != e1
    finally:
        dist.destroy_process_group()
    # two ranks see disjoint halves
    shards = [list(torch.utils.data.DistributedSampler(tiny_train, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == len(tiny_train)


def test_memmapped_dataset_pickles_as_a_path(tiny_train):
    blob = pickle.dumps(tiny_train)
    assert len(blob) < 10_000            # not a copy of the images
    back = pickle.loads(blob)
    assert torch.equal(back[5][0], tiny_train[5][0])


def test_sanity_raw_pixel_pairs_trick_matches_full_embeddings(tiny_val):
    from evaluate import metrics
    from evaluate.sanity import raw_pixel_metrics

    x = tiny_val.images.reshape(len(tiny_val.images), -1).astype(np.float64)
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    full = metrics.verification_metrics(x, tiny_val.issame, nfolds=tiny_val.nfolds)
    got = raw_pixel_metrics(tiny_val.images, tiny_val.issame, tiny_val.nfolds)["centred"]
    assert got["accuracy"] == pytest.approx(full["accuracy"], abs=1e-4)
    assert got["auc"] == pytest.approx(full["auc"], abs=1e-3)


def test_lfw_official_layout_images_in_subfolder(tmp_path, tiny_val):
    small = _head(tiny_val, 2)
    out = formats.write_lfw(tmp_path / "x", small, image_format="png")
    root = tmp_path / "lfwroot"; root.mkdir()
    (out / "pairs.txt").rename(root / "pairs.txt")
    out.rename(root / "lfw-deepfunneled")
    vs = open_verification_set(str(root))
    assert np.array_equal(vs.images, small.images) and vs.nfolds == 1


def test_bad_image_error_from_a_worker_is_one_line(tmp_path, tiny_train):
    root = formats.write_folder(tmp_path / "f", tiny_train.images[:8], tiny_train.labels[:8])
    ds = open_train_set(str(root), max_bad_fraction=0.0)
    ds.paths[5].write_bytes(b"broken")
    with pytest.raises(FacekdError) as e:
        for _ in make_loader(ds, 4, workers=1, shuffle=False):
            pass
    assert "\n" not in str(e.value) and str(ds.paths[5]) in str(e.value) and "max_bad_fraction=0" in str(e.value)
