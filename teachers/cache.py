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

from facekd.io import FacekdError, _json_default, cli_main, read_manifest, sha256_file, write_manifest

KIND = "teacher-cache"
# What a cache's content depends on, in the order a mismatch is reported.
# Not the facekd version: a shipped cache (teachers/zoo/) must outlive releases; CACHE_FORMAT changes instead when
# what build_cache writes changes meaning.
KEY_FIELDS = ("teacher_arch", "teacher_sha256", "dataset", "num_images", "preprocessing", "synthfaces_version",
              "cache_format")
CACHE_FORMAT = 1
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
        for name, sha in (manifest.get("files") or {}).items():  # shipped caches: catch truncated/LFS-pointer files
            if not (root / name).is_file() or sha256_file(root / name) != sha:
                raise FacekdError(f"teacher cache {root} is corrupt: {name} is missing or does not match the "
                                  f"sha256 in its manifest")
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
        return torch.from_numpy(np.asarray(self.embeddings[idx, np.broadcast_to(flip, idx.shape)], dtype=np.float32))


def key_mismatch(have: dict[str, Any], expect: dict[str, Any]) -> str:
    """'' when every field of `expect` equals the cache's, else a phrase naming the first differing field."""
    for field in [*KEY_FIELDS, *sorted(set(expect) - set(KEY_FIELDS))]:
        if field in expect and have.get(field) != expect[field]:
            return f"{field} differs (cache: {_short(have.get(field))}, expected: {_short(expect[field])})"
    return ""


Embed = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC RGB -> (B, D) float embeddings (evaluate.embed.Embedder)


def build_cache(embed: Embed, dataset: Any, out: str | os.PathLike, *, key: dict[str, Any], batch_size: int = 128,
                workers: int = 0, progress: bool = True, settings: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> TeacherCache:
    """Run `embed` over every image of `dataset` and its flip; write the cache to `out` atomically.

    `extra` goes into the manifest as is (e.g. the teacher's verification accuracy); the manifest also lists the
    sha256 of each array file, which `TeacherCache.open` checks.

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
                       seconds=round(time.perf_counter() - start, 2),
                       files={name: sha256_file(tmp / name) for name in ("embeddings.npy", "centres.npy")},
                       **(extra or {}))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache.open(out, key)


def known_teacher_key(teacher: str) -> tuple[str, dict[str, Any]] | None:
    """(sha256, preprocessing) of a teacher whose file is fixed and known without loading it (SFace), else None."""
    if teacher != "sface":
        return None
    from teachers.onnx_teacher import SFACE_PREPROCESSING, SFACE_SHA256

    return SFACE_SHA256, dict(SFACE_PREPROCESSING)


def teacher_embedder(teacher: str, weights: str | None, device: str = "cpu") -> tuple[Embed, str, dict]:
    """(embedder, weights sha256, preprocessing) for a registry name + weights file, `onnx:PATH`, or `sface`."""
    from facekd import models

    if weights:
        if not Path(weights).is_file():
            raise FacekdError(f"teacher weights not found: {weights}")
        embedder = models.load_embedder(weights, arch=teacher, device=device)
        sha = sha256_file(weights)
    elif teacher.startswith("onnx:") or teacher == "sface":
        from teachers.onnx_teacher import sface_path

        embedder = models.load_embedder(teacher, device=device)
        # the file as given, not the repaired copy onnxruntime runs: the key must not move when the repair does
        sha = sha256_file(teacher[5:] if teacher.startswith("onnx:") else sface_path())
    else:
        raise FacekdError(f"teacher {teacher!r} needs --teacher-weights (a facekd checkpoint or an insightface "
                          f"backbone.pth); random weights teach nothing")
    return embedder, sha, dict(embedder.preprocessing)


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
    from engine.presets import PRESET_CHOICES

    ap = argparse.ArgumentParser(prog="python -m teachers.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="registry name (r18..r200, timm:NAME), onnx:PATH or sface")
    ap.add_argument("--teacher-weights", help="facekd checkpoint (.safetensors) or insightface backbone.pth")
    ap.add_argument("--data", default=None, help="training set spec (facedata.open_train_set; default synthfaces, "
                                                "with --preset smoke synthfaces:tiny)")
    ap.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                    help="smoke: tiny data by default and rows marked as smoke; other presets change nothing here")
    ap.add_argument("--out", help=f"cache directory (default {DEFAULT_ROOT}/TEACHER-DATA-KEY)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--force", action="store_true", help="rebuild even when an up-to-date cache exists")
    ap.add_argument("--val", nargs="*", default=[], metavar="SET",
                    help="also measure the teacher's verification accuracy on these sets (recorded in the manifest)")
    ap.add_argument("--results", metavar="CSV", help="with --val: write the teacher's rows into this results table")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        raise FacekdError(f"--batch-size must be >= 1, got {args.batch_size}")
    from engine.presets import default_data, preset_notes, resolve_preset
    from facedata import open_train_set

    preset = resolve_preset(args.preset)
    args.data = default_data(preset, args.data)

    dataset = open_train_set(args.data)
    embed, sha, pre = teacher_embedder(args.teacher, args.teacher_weights, args.device)
    key = cache_key(teacher_arch=args.teacher, teacher_sha256=sha, dataset=dataset, preprocessing=pre)
    out = Path(args.out) if args.out else default_cache_dir(args.teacher, dataset, key)
    if not args.force and (out / "manifest.json").is_file():
        manifest = read_manifest(out)
        if manifest and manifest.get("kind") == KIND and not key_mismatch(manifest.get("key", {}), key):
            print(f"teacher cache {out} is up to date ({len(dataset)} images)")
            return 0
    val = teacher_accuracy(embed, args.val, teacher=args.teacher) if args.val else {}
    cache = build_cache(embed, dataset, out, key=key, batch_size=args.batch_size, workers=args.workers,
                        settings={"teacher": args.teacher, "data": args.data, "batch_size": args.batch_size},
                        extra={"teacher_val": val} if val else None)
    print(f"wrote teacher cache {out}: {cache.num_images} images x 2 views x {cache.embedding_dim}-d, "
          f"{cache.num_classes} class centres")
    if args.results and val:
        from facekd.table import upsert_rows

        upsert_rows([{**row, "notes": preset_notes(preset)} for row in teacher_rows(cache.manifest)], args.results)
        print(f"results: teacher row(s) -> {args.results}")
    return 0


if __name__ == "__main__":
    main()
