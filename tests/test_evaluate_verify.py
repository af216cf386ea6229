"""evaluate.embed and evaluate.verify: embedders against numpy references, and the CLI end to end on an
insightface-style .bin (pickle of JPEG bytes) with a tiny ONNX model."""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import facedata
from evaluate.embed import OnnxEmbedder, TorchEmbedder, embed_images
from evaluate.verify import evaluate_sets, main

DIM = 32
BGR_PRE = {"input_size": [112, 112], "channel_order": "BGR", "mean": [100.0, 120.0, 140.0], "std": [50.0, 60.0, 70.0]}


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3 * 14 * 14, DIM)).astype(np.float32)


def write_onnx(path, w: np.ndarray, *, batch=None, metadata: dict | None = None):
    """input (N,3,112,112) -> 8x8 average pool -> flatten -> matmul W -> (N, DIM): deterministic, no training."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = batch if batch is not None else "N"
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["embedding"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [n, DIM])],
        initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if metadata is not None:
        helper.set_model_props(model, {"facekd": json.dumps(metadata)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def numpy_reference(images: np.ndarray, w: np.ndarray, pre: dict) -> np.ndarray:
    x = images.astype(np.float64)
    if pre["channel_order"] == "BGR":
        x = x[..., ::-1]
    x = (x - np.array(pre["mean"])) / np.array(pre["std"])
    x = x.transpose(0, 3, 1, 2).reshape(len(x), 3, 14, 8, 14, 8).mean(axis=(3, 5))
    return x.reshape(len(x), -1) @ w.astype(np.float64)


def random_faces(n: int, seed: int) -> np.ndarray:
    """Smooth random 112x112 RGB images (14x14 noise upsampled): distinct, and small as JPEG."""
    low = np.random.default_rng(seed).integers(0, 256, (n, 14, 14, 3), dtype=np.uint8)
    return np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)


def test_onnx_embedder_reads_facekd_metadata_and_matches_numpy(tmp_path):
    w = weights()
    path = write_onnx(tmp_path / "m.onnx", w, metadata={"preprocessing": BGR_PRE, "embedding_dim": DIM, "arch": "tiny"})
    emb = OnnxEmbedder(path, threads=1)
    assert emb.preprocessing["channel_order"] == "BGR" and emb.name == "tiny" and emb.embedding_dim == DIM
    images = random_faces(5, 1)
    np.testing.assert_allclose(emb(images), numpy_reference(images, w, BGR_PRE), rtol=1e-4, atol=1e-4)
    # the reference is sensitive to the channel order and mean/std: RGB would give something else
    assert not np.allclose(emb(images), numpy_reference(images, w, {**BGR_PRE, "channel_order": "RGB"}), atol=1e-2)


def test_onnx_embedder_foreign_fixed_batch_and_overrides(tmp_path):
    w = weights(1)
    images = random_faces(5, 2)
    fixed = write_onnx(tmp_path / "fixed.onnx", w, batch=1)
    with pytest.warns(UserWarning, match="assuming insightface"):
        emb = OnnxEmbedder(fixed, threads=1)
    default = {"input_size": [112, 112], "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3}
    assert emb.preprocessing == default and emb.embedding_dim == DIM
    np.testing.assert_allclose(emb(images), numpy_reference(images, w, default), rtol=1e-4, atol=1e-4)
    # a partial dict overrides single fields over the default, which is still assumed, so it still warns
    with pytest.warns(UserWarning, match="assuming insightface"):
        bgr = OnnxEmbedder(write_onnx(tmp_path / "dyn.onnx", w), {"channel_order": "BGR"}, threads=1)
    np.testing.assert_allclose(bgr(images), numpy_reference(images, w, {**default, "channel_order": "BGR"}),
                               rtol=1e-4, atol=1e-4)


def test_torch_embedder_agrees_with_onnx_and_flip_sum(tmp_path):
    w = weights(2)
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 14 * 14, DIM, bias=False))
    with torch.no_grad():
        model[2].weight.copy_(torch.from_numpy(w.T))
    model.preprocessing = BGR_PRE
    model.train()
    torch_emb = TorchEmbedder(model)
    assert not model.training and torch_emb.embedding_dim == DIM
    onnx_emb = OnnxEmbedder(write_onnx(tmp_path / "m.onnx", w, metadata={"preprocessing": BGR_PRE}), threads=1)
    images = random_faces(6, 3)
    np.testing.assert_allclose(torch_emb(images), onnx_emb(images), rtol=1e-4, atol=1e-4)
    ref = numpy_reference(images, w, BGR_PRE) + numpy_reference(images[:, :, ::-1], w, BGR_PRE)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = embed_images(torch_emb, images, batch_size=4, progress=False)  # 2 batches, the last one short
    np.testing.assert_allclose(got, ref, atol=1e-5)
    plain = numpy_reference(images, w, BGR_PRE)
    np.testing.assert_allclose(embed_images(onnx_emb, images, flip=False, progress=False),
                               plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=1e-5)


# ------------------------------------------------------------------------------ end to end on an insightface .bin

def write_bin(path, images: np.ndarray, issame: list[bool]) -> None:
    """Exactly what insightface's tools write: pickle.dump((list of JPEG bytes, list of bools), f)."""
    from PIL import Image

    bins = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        bins.append(buf.getvalue())
    with open(path, "wb") as fh:
        pickle.dump((bins, issame), fh, protocol=pickle.HIGHEST_PROTOCOL)


@pytest.fixture(scope="module")
def bin_files(tmp_path_factory):
    """300 pairs: genuine pairs are the same image twice, impostors two different random images."""
    root = tmp_path_factory.mktemp("bins")
    pairs = 300
    rng = np.random.default_rng(0)
    issame = (rng.random(pairs) < 0.5).tolist()
    faces = random_faces(2 * pairs, 4)
    for i, same in enumerate(issame):
        if same:
            faces[2 * i + 1] = faces[2 * i]
    write_bin(root / "pairs.bin", faces, issame)
    write_bin(root / "shuffled.bin", faces, rng.permutation(issame).tolist())
    write_onnx(root / "tiny.onnx", weights(3), metadata={"preprocessing": {
        "input_size": [112, 112], "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3},
        "embedding_dim": DIM, "arch": "tiny"})
    return root, pairs


@pytest.mark.slow
def test_verify_cli_end_to_end_on_insightface_bin(bin_files, capsys, tmp_path):
    root, pairs = bin_files
    png = tmp_path / "roc.png"
    assert main([str(root / "tiny.onnx"), str(root / "pairs.bin"), str(root / "shuffled.bin"), "--json",
                 "--quiet", "--threads", "1", "--batch-size", "64", "--roc", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"pairs", "shuffled"}
    for metrics in out.values():
        assert set(metrics) == {"accuracy", "std", "tar_at_far", "auc", "eer", "pairs"}
        assert metrics["pairs"] == pairs
        assert metrics["tar_at_far"] == {"1e-3": None, "1e-4": None}  # ~135 impostors per training split
    assert out["pairs"]["accuracy"] == 1.0 and out["pairs"]["std"] == 0.0
    assert out["pairs"]["auc"] == 1.0 and out["pairs"]["eer"] == 0.0
    assert abs(out["shuffled"]["accuracy"] - 0.5) < 0.1 and abs(out["shuffled"]["auc"] - 0.5) < 0.1
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the readable table names both sets and the same accuracy
    assert main([str(root / "tiny.onnx"), str(root / "pairs.bin"), "--quiet", "--no-flip", "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "flip: no" in table and "1.00000 +- 0.00000" in table and "TAR@FAR=1e-3" in table

    # --results writes one row per set into the results table
    from facekd.table import read_table

    summary = root / "summary.csv"
    assert main([str(root / "tiny.onnx"), str(root / "pairs.bin"), "--quiet", "--threads", "1",
                 "--results", str(summary), "--stage", "teacher", "--run", "demo"]) == 0
    rows = read_table(summary)
    assert list(rows["dataset"]) == ["pairs"] and rows.loc[0, "stage"] == "teacher"
    assert rows.loc[0, "accuracy"] == 1.0 and rows.loc[0, "file_bytes"] == (root / "tiny.onnx").stat().st_size


def test_evaluate_sets_writes_rocs_and_names_duplicates(bin_files, tmp_path):
    root, pairs = bin_files
    full = facedata.open_verification_set(str(root / "pairs.bin"))  # the real insightface reader
    vset = facedata.VerificationSet("pairs", full.images[:200], full.issame[:100])
    five = facedata.VerificationSet("pairs", vset.images, vset.issame, nfolds=5)  # e.g. a pairs.txt with 5 folds
    emb = OnnxEmbedder(root / "tiny.onnx", threads=1)
    results = evaluate_sets(emb, [vset, five], batch_size=128, roc_dir=tmp_path, progress=False)
    assert list(results) == ["pairs", "pairs#2"] and results["pairs"]["accuracy"] == 1.0
    assert (results["pairs"]["nfolds"], results["pairs#2"]["nfolds"]) == (10, 5)  # each set's own folds
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["roc_pairs.png", "roc_pairs_2.png"]


def test_cli_errors_are_one_line(bin_files, tmp_path, capsys):
    root, _ = bin_files
    cases = [
        ([str(tmp_path / "missing.onnx"), str(root / "pairs.bin")], "model not found"),
        ([str(root / "tiny.onnx"), str(tmp_path / "nope.bin")], "verification set not found"),
        ([str(root / "tiny.onnx"), str(root / "pairs.bin"), "--mean", "1", "2"], "--mean takes 1 or 3 values"),
        ([str(root / "tiny.onnx"), str(root / "pairs.bin"), "--input-size", "96", "96"], "model input is 112x112"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--quiet", "--threads", "1"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    # the module entry point itself: exit status 2 and exactly one line on stderr
    proc = subprocess.run([sys.executable, "-m", "evaluate.verify", str(tmp_path / "missing.onnx"), "synthfaces:tiny"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == f"error: model not found: {tmp_path / 'missing.onnx'}\n"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with warnings.catch_warnings(), pytest.raises(SystemExit):
        main([str(broken), str(root / "pairs.bin"), "--quiet"])
    assert "error: cannot read ONNX model" in capsys.readouterr().err


def test_random_weights_and_unreadable_checkpoints_are_refused(bin_files, tmp_path, capsys):
    from evaluate.embed import load_embedder
    from facekd.models import create_model, save_checkpoint

    root, _ = bin_files
    good = save_checkpoint(create_model("mobilefacenet_s", width=0.25), tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    (tmp_path / "image.pth").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    results = tmp_path / "summary.csv"
    cases = [  # (argv, message): refused before any set is opened or any row written
        (["mbf", str(root / "pairs.bin")], "'mbf' is an architecture name, not a trained model"),
        (["mbf", str(root / "pairs.bin"), "--random-weights", "--results", str(results)], "drop --results"),
        ([str(tmp_path / "cut.safetensors"), str(root / "pairs.bin")], "cannot read safetensors checkpoint"),
        ([str(tmp_path / "image.pth"), str(root / "pairs.bin"), "--arch", "mbf"], "corrupt or not a torch file"),
        ([str(root / "tiny.onnx"), str(root / "pairs.bin"), "--arch", "r50"], "an ONNX file carries its own"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--quiet", "--threads", "1"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
        assert "weights_only" not in err
    assert not results.exists()
    for hint in ("checkpoint", "backbone.pth with --arch", "ONNX file"):  # the refusal says what to pass instead
        assert hint in str(pytest.raises(Exception, load_embedder, "r100").value)
    embedder = load_embedder("mobilefacenet_s", allow_random_weights=True, width=0.25)  # tests may, explicitly
    assert isinstance(embedder, TorchEmbedder) and embedder(random_faces(2, 0)).shape == (2, embedder.embedding_dim)


def test_embed_set_cache_reuses_only_the_same_file_set_and_flip(tmp_path, monkeypatch):
    from facedata.formats import VerificationSet
    from evaluate.embed import embed_set

    monkeypatch.setenv("FACEKD_CACHE", str(tmp_path / "cache"))
    images = random_faces(8, 5)
    vset = VerificationSet("toy", images, np.array([True, False, True, False]), fingerprint="f" * 16)
    emb = OnnxEmbedder(write_onnx(tmp_path / "m.onnx", weights(3), metadata={"preprocessing": BGR_PRE}), threads=1)
    calls = []
    real_call = OnnxEmbedder.__call__
    monkeypatch.setattr(OnnxEmbedder, "__call__", lambda self, x: calls.append(len(x)) or real_call(self, x))
    first = embed_set(emb, vset, cache=True, progress=False)
    assert calls == [8, 8]  # image + flip
    again = embed_set(emb, vset, cache=True, progress=False)
    assert calls == [8, 8] and np.array_equal(first, again) and again.dtype == np.float64
    embed_set(emb, vset, flip=False, cache=True, progress=False)  # another protocol: not a hit
    assert calls == [8, 8, 8]
    other = OnnxEmbedder(write_onnx(tmp_path / "m2.onnx", weights(4), metadata={"preprocessing": BGR_PRE}), threads=1)
    assert not np.allclose(embed_set(other, vset, cache=True, progress=False), first)  # another file: not a hit
    unnamed = VerificationSet("toy", images, vset.issame)  # no fingerprint: never cached
    embed_set(emb, unnamed, cache=True, progress=False)
    assert len(calls) == 7
    (entry,) = [p for p in (tmp_path / "cache" / "embeddings").iterdir() if p.name.startswith(emb.cache_id[:16])
                and p.name.endswith("-flip.npy")]
    entry.write_bytes(b"not an array")  # a damaged entry is recomputed, not trusted
    np.testing.assert_array_equal(embed_set(emb, vset, cache=True, progress=False), first)
    assert len(calls) == 9


def test_module_embedder_runs_the_onnx_export_with_torch_numerics():
    from evaluate.embed import module_embedder
    from facekd.models import create_model

    torch.manual_seed(0)
    model = create_model("mobilefacenet", embedding_dim=32).eval()
    fast = module_embedder(model)
    assert isinstance(fast, OnnxEmbedder) and fast.embedding_dim == 32 and fast.cache_id is None
    images = random_faces(3, 6)
    np.testing.assert_allclose(fast(images), TorchEmbedder(model)(images), rtol=1e-3, atol=1e-4)
