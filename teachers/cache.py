"""Teacher knowledge cache: run the teacher once over the training set, so no student step ever runs it.

An r100 forward costs ~24 GFLOPs per image against ~0.44 for a MobileFaceNet student step, so an online teacher
makes distillation ~20x dearer than training the student alone. Horizontal flip is the only augmentation of the
insightface recipe, so two teacher embeddings per image (as-is and flipped) are all a student step can ask for.

Layout of a cache directory (all arrays fp16, memory-mapped when read):
    embeddings.npy  (N, 2, D)  L2-normalised teacher embedding of training image i, [i, 0] as-is, [i, 1] flipped
    centres.npy     (C, D)     per-identity centre: mean of the normalised embeddings (both views), renormalised
    manifest.json   facekd manifest whose `key` names what the cache depends on (`KEY_FIELDS`); a cache whose key
                    differs from what the reader expects is refused with the differing field named.

    python -m teachers.cache --teacher r100 --teacher-weights backbone.pth --data synthfaces [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from facekd import __version__
from facekd.io import FacekdError, _json_default, cli_main, read_manifest, sha256_file, write_manifest

KIND = "teacher-cache"
# What a cache's content depends on, in the order a mismatch is reported.
KEY_FIELDS = ("teacher_arch", "teacher_sha256", "dataset", "num_images", "preprocessing", "synthfaces_version",
              "facekd_version")
ZOO_DIR = Path(__file__).resolve().parent / "zoo"
DEFAULT_ROOT = Path("runs") / "teacher-cache"


def dataset_key(dataset: Any) -> dict[str, Any]:
    """The dataset part of a cache key: fingerprint, size and, for SynthFaces, the generator version."""
    synth_version = None
    if str(getattr(dataset, "name", "")).startswith("synthfaces"):
        from facedata.synthfaces import SYNTHFACES_VERSION
        synth_version = SYNTHFACES_VERSION
    return {"dataset": dataset.fingerprint, "num_images": int(len(dataset)), "synthfaces_version": synth_version}


def cache_key(*, teacher_arch: str, teacher_sha256: str | None, dataset: Any,
              preprocessing: dict | None) -> dict[str, Any]:
    """The full key of a cache. Readers may pass a subset (e.g. no sha256 when they look for any r100 cache)."""
    key = {"teacher_arch": teacher_arch, "teacher_sha256": teacher_sha256, **dataset_key(dataset),
           "facekd_version": __version__}
    if preprocessing is not None:
        key["preprocessing"] = dict(preprocessing)
    return json.loads(json.dumps(key, default=_json_default))  # tuples -> lists: compares equal to the stored key


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class TeacherCache:
    """Read side of a cache directory: `lookup(indices, flipped)` and `centres`."""

    def __init__(self, root: Path, manifest: dict, embeddings: np.ndarray, centres: np.ndarray) -> None:
        self.root, self.manifest = root, manifest
        self.key: dict[str, Any] = manifest["key"]
        self.embeddings = embeddings  # (N, 2, D) fp16 memmap
        self.centres = torch.from_numpy(np.asarray(centres, dtype=np.float32))

    @property
    def num_images(self) -> int:
        return self.embeddings.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.embeddings.shape[2]

    @property
    def num_classes(self) -> int:
        return self.centres.shape[0]

    @classmethod
    def open(cls, directory: str | os.PathLike, expect: dict[str, Any] | None = None) -> "TeacherCache":
        """Open a cache, refusing (FacekdError) a missing/corrupt one or one whose key differs from `expect`."""
        root = Path(directory)
        manifest = read_manifest(root) if root.is_dir() else None
        if manifest is None or manifest.get("kind") != KIND or "key" not in manifest:
            raise FacekdError(f"{root} is not a teacher cache (no {KIND} manifest.json); "
                              f"build one with `python -m teachers.cache`")
        mismatch = key_mismatch(manifest["key"], expect or {})
        if mismatch:
            raise FacekdError(f"teacher cache {root} is stale: {mismatch}; rebuild it with `python -m teachers.cache` "
                              f"or remove the directory")
        try:
            emb = np.load(root / "embeddings.npy", mmap_mode="r")
            centres = np.load(root / "centres.npy")
        except (OSError, ValueError) as err:
            raise FacekdError(f"teacher cache {root} is corrupt: {err}") from None
        n, d, c = manifest["key"]["num_images"], manifest["embedding_dim"], manifest["num_classes"]
        if emb.shape != (n, 2, d) or centres.shape != (c, d) or emb.dtype != np.float16:
            raise FacekdError(f"teacher cache {root} is corrupt: embeddings {emb.shape} {emb.dtype}, centres "
                              f"{centres.shape}, manifest says ({n}, 2, {d}) and ({c}, {d}) fp16")
        return cls(root, manifest, emb, centres)

    @classmethod
    def find(cls, expect: dict[str, Any], candidates: Iterable[str | os.PathLike]) -> "TeacherCache | None":
        """The first cache among `candidates` (directories, or parents of cache directories) matching `expect`."""
        for cand in candidates:
            cand = Path(cand)
            if (cand / "manifest.json").is_file():
                dirs = [cand]
            else:
                dirs = sorted(p for p in cand.iterdir() if p.is_dir()) if cand.is_dir() else []
            for d in dirs:
                manifest = read_manifest(d) if (d / "manifest.json").is_file() else None
                if manifest and manifest.get("kind") == KIND and not key_mismatch(manifest.get("key", {}), expect):
                    return cls.open(d, expect)
        return None

    def lookup(self, indices: torch.Tensor | np.ndarray, flipped: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Teacher embeddings (B, D) float32 of training images `indices`, flipped where `flipped` is true."""
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)
        flip = np.asarray(flipped.cpu() if torch.is_tensor(flipped) else flipped, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise FacekdError(f"teacher cache {self.root} has {self.num_images} images; asked for index "
                              f"{int(idx.max() if idx.max() >= self.num_images else idx.min())}")
        return torch.from_numpy(np.asarray(self.embeddings[idx, np.broadcast_to(flip, idx.shape)], dtype=np.float32))


def key_mismatch(have: dict[str, Any], expect: dict[str, Any]) -> str:
    """'' when every field of `expect` equals the cache's, else a phrase naming the first differing field."""
    for field in [*KEY_FIELDS, *sorted(set(expect) - set(KEY_FIELDS))]:
        if field in expect and have.get(field) != expect[field]:
            return f"{field} differs (cache: {_short(have.get(field))}, expected: {_short(expect[field])})"
    return ""


Embed = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC RGB -> (B, D) float embeddings (evaluate.embed.Embedder)


def build_cache(embed: Embed, dataset: Any, out: str | os.PathLike, *, key: dict[str, Any], batch_size: int = 128,
                workers: int = 0, progress: bool = True, settings: dict[str, Any] | None = None) -> TeacherCache:
    """Run `embed` over every image of `dataset` and its flip; write the cache to `out` atomically.

    The directory appears complete or not at all: everything goes to a sibling temp dir that is renamed at the end.
    """
    from tqdm import tqdm

    out = Path(out)
    n, num_classes = len(dataset), int(dataset.num_classes)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                             num_workers=workers)
        emb = None
        sums = None
        seen = np.zeros(n, dtype=bool)
        start = time.perf_counter()
        with tqdm(total=n, desc="teacher cache", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for images, labels, indices in loader:
                nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
                views = []
                for batch in (nhwc, np.ascontiguousarray(nhwc[:, :, ::-1])):
                    e = np.asarray(embed(batch), dtype=np.float32)
                    if not np.isfinite(e).all():
                        raise FacekdError("teacher produced non-finite embeddings; check --teacher-weights")
                    views.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
                if emb is None:
                    dim = views[0].shape[1]
                    emb = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float16,
                                                    shape=(n, 2, dim))
                    sums = np.zeros((num_classes, dim), dtype=np.float64)
                idx = indices.numpy().astype(np.int64)
                emb[idx] = np.stack(views, axis=1).astype(np.float16)
                np.add.at(sums, labels.numpy().astype(np.int64), views[0] + views[1])
                seen[idx] = True
                bar.update(len(idx))
        if emb is None or not seen.all():
            raise FacekdError(f"dataset returned {int(seen.sum())} of {n} images; the cache needs every index once")
        emb.flush()
        del emb
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centres = np.where(norms > 0, sums / np.maximum(norms, 1e-12), 0.0).astype(np.float16)
        np.save(tmp / "centres.npy", centres)
        write_manifest(tmp, KIND, settings or {}, inputs={"dataset": key.get("dataset"),
                                                          "teacher_sha256": key.get("teacher_sha256")},
                       key=key, embedding_dim=int(centres.shape[1]), num_classes=num_classes,
                       seconds=round(time.perf_counter() - start, 2))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache.open(out, key)


def teacher_embedder(teacher: str, weights: str | None, device: str = "cpu") -> tuple[Embed, str, dict]:
    """(embedder, weights sha256, preprocessing) for a registry name + weights file, `onnx:PATH`, or `sface`."""
    from facekd import models

    if weights:
        if not Path(weights).is_file():
            raise FacekdError(f"teacher weights not found: {weights}")
        embedder = models.load_embedder(weights, arch=teacher, device=device)
        sha = sha256_file(weights)
    elif teacher.startswith("onnx:") or teacher == "sface":
        embedder = models.load_embedder(teacher, device=device)
        path = teacher[5:] if teacher.startswith("onnx:") else getattr(embedder, "path", None)
        sha = sha256_file(path) if path and Path(path).is_file() else teacher
    else:
        raise FacekdError(f"teacher {teacher!r} needs --teacher-weights (a facekd checkpoint or an insightface "
                          f"backbone.pth); random weights teach nothing")
    return embedder, sha, dict(embedder.preprocessing)


def default_cache_dir(teacher: str, dataset: Any, key: dict[str, Any]) -> Path:
    from facekd.io import fingerprint

    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{teacher}-{dataset.name}")
    return DEFAULT_ROOT / f"{safe}-{fingerprint(key)[:8]}"


def search_dirs(run_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where readers look for a matching cache: the run's own, the default build root, the shipped zoo."""
    dirs = [Path(run_dir) / "cache"] if run_dir else []
    return [*dirs, DEFAULT_ROOT, ZOO_DIR]


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m teachers.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="registry name (r18..r200, timm:NAME), onnx:PATH or sface")
    ap.add_argument("--teacher-weights", help="facekd checkpoint (.safetensors) or insightface backbone.pth")
    ap.add_argument("--data", default="synthfaces", help="training set spec (facedata.open_train_set)")
    ap.add_argument("--out", help=f"cache directory (default {DEFAULT_ROOT}/TEACHER-DATA-KEY)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--force", action="store_true", help="rebuild even when an up-to-date cache exists")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        raise FacekdError(f"--batch-size must be >= 1, got {args.batch_size}")
    from facedata import open_train_set

    dataset = open_train_set(args.data)
    embed, sha, pre = teacher_embedder(args.teacher, args.teacher_weights, args.device)
    key = cache_key(teacher_arch=args.teacher, teacher_sha256=sha, dataset=dataset, preprocessing=pre)
    out = Path(args.out) if args.out else default_cache_dir(args.teacher, dataset, key)
    if not args.force and (out / "manifest.json").is_file():
        manifest = read_manifest(out)
        if manifest and manifest.get("kind") == KIND and not key_mismatch(manifest.get("key", {}), key):
            print(f"teacher cache {out} is up to date ({len(dataset)} images)")
            return 0
    cache = build_cache(embed, dataset, out, key=key, batch_size=args.batch_size, workers=args.workers,
                        settings={"teacher": args.teacher, "data": args.data, "batch_size": args.batch_size})
    print(f"wrote teacher cache {out}: {cache.num_images} images x 2 views x {cache.embedding_dim}-d, "
          f"{cache.num_classes} class centres")
    return 0


if __name__ == "__main__":
    main()
