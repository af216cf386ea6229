"""Datasets and loading: `open_train_set`, `open_verification_set`, `FaceDataset`, `make_loader`.

Bad images are never dropped silently. File-backed datasets check what is cheap on open (zero-byte files, record
headers) and decode lazily; an image that fails to decode is logged, recorded in `dataset.bad_files`, and replaced
by the next readable image of the SAME identity (so labels stay right). Once more than `max_bad_fraction` of the
dataset (default 0.001, env `FACEKD_MAX_BAD_FRACTION`) is bad, reading stops with a FacekdError naming the first
files. With DataLoader workers each worker counts what it saw and stops at its share (1/workers) of the limit, so
all workers together never pass `max_bad_fraction`. Verification sets are decoded whole on open and any bad
image is an error.

    python -m facedata.datasets SPEC [--verification] [--decode-bench N]    # size, classes, fingerprint, decode rate
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from facekd.io import FacekdError, cli_main, sha256_file
from facedata import formats, synthfaces
from facedata.formats import BadImage, VerificationSet

log = logging.getLogger("facedata")

DEFAULT_MAX_BAD_FRACTION = 0.001


def _max_bad_fraction(value: float | None) -> float:
    if value is None:
        env = os.environ.get("FACEKD_MAX_BAD_FRACTION")
        try:
            value = float(env) if env else DEFAULT_MAX_BAD_FRACTION
        except ValueError:
            raise FacekdError(f"FACEKD_MAX_BAD_FRACTION={env!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise FacekdError(f"max_bad_fraction must be in [0, 1], got {value}")
    return value


class FaceDataset(Dataset):
    """Training images of identities: item i -> (uint8 CHW tensor (3, 112, 112), label, i)."""

    name: str
    num_classes: int
    labels: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """uint8 HWC RGB (112, 112, 3)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = self.image(int(i))
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), int(self.labels[i]), int(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={self.num_classes})"


class ArrayFaceDataset(FaceDataset):
    """Images already decoded in a (memory-mapped) uint8 array, e.g. SynthFaces: loading is a copy."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, fingerprint: str):
        self.name, self.images, self.fingerprint = name, images, fingerprint
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0

    def image(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i])

    def __getstate__(self) -> dict[str, Any]:
        # a memmap would be pickled as a full copy into every worker; send its path and map it again instead
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap) and self.images.filename:
            state["images"] = ("memmap", self.images.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("images"), tuple) and state["images"][0] == "memmap":
            state["images"] = np.load(state["images"][1], mmap_mode="r")
        self.__dict__.update(state)


class _FileFaceDataset(FaceDataset):
    """Common bad-image policy for datasets that decode files lazily."""

    def __init__(self, name: str, labels: np.ndarray, fingerprint: str, max_bad_fraction: float | None):
        self.name, self.fingerprint = name, fingerprint
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.max_bad_fraction = _max_bad_fraction(max_bad_fraction)
        self.total = len(self.labels)  # images the source holds, readable or not (the fraction's denominator)
        self.bad_files: dict[int, str] = {}
        self._by_label: dict[int, np.ndarray] | None = None

    def _decode(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _where(self, i: int) -> str:
        raise NotImplementedError

    def _record_bad(self, i: int, reason: str) -> None:
        if i in self.bad_files:
            return
        self.bad_files[i] = reason
        log.warning("%s: unreadable image %s; substituting another image of identity %d", self.name, reason,
                    int(self.labels[i]))
        self._check_bad()

    def _check_bad(self) -> None:
        limit = self.max_bad_fraction * max(self.total, 1)
        worker = torch.utils.data.get_worker_info()
        share = ""
        if worker is not None and worker.num_workers > 1:  # each worker sees only its own bad images
            limit /= worker.num_workers
            share = f", this DataLoader worker's 1/{worker.num_workers} share"
        if len(self.bad_files) > limit:
            first = ", ".join(self._where(i) for i in list(self.bad_files)[:5])
            raise FacekdError(f"{self.name}: {len(self.bad_files)} unreadable images of {self.total} exceed "
                              f"max_bad_fraction={self.max_bad_fraction:g}{share} (FACEKD_MAX_BAD_FRACTION); "
                              f"first: {first}")

    def image(self, i: int) -> np.ndarray:
        try:
            return self._decode(i)
        except BadImage as err:
            self._record_bad(i, str(err))
        if self._by_label is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
            self._by_label = {c: order[bounds[c]:bounds[c + 1]] for c in range(self.num_classes)}
        same = self._by_label[int(self.labels[i])]
        start = int(np.searchsorted(same, i))
        for j in np.roll(same, -start).tolist():  # the next images of this identity, in a fixed order
            if j == i or j in self.bad_files:
                continue
            try:
                return self._decode(j)
            except BadImage as err:
                self._record_bad(j, str(err))
        raise FacekdError(f"{self.name}: every image of identity {int(self.labels[i])} is unreadable, e.g. "
                          f"{self._where(i)}")


class FolderFaceDataset(_FileFaceDataset):
    """One sub-folder per identity; labels follow sorted folder names."""

    def __init__(self, root: str | os.PathLike, *, max_bad_fraction: float | None = None):
        self.root = Path(root)
        self.paths, labels, self.class_names = formats.scan_folder(self.root)
        stats = [p.stat() for p in self.paths]
        fp = hashlib.sha256()
        for p, st in zip(self.paths, stats):
            fp.update(f"{p.relative_to(self.root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        super().__init__(self.root.name, labels, fp.hexdigest()[:16], max_bad_fraction)
        for i, st in enumerate(stats):  # cheap check on open: an empty file is surely bad
            if st.st_size == 0:
                self._record_bad(i, f"{self.paths[i]}: empty file")

    def _where(self, i: int) -> str:
        return str(self.paths[i])

    def _decode(self, i: int) -> np.ndarray:
        try:
            data = self.paths[i].read_bytes()
        except OSError as err:
            raise BadImage(f"{self.paths[i]}: {err}") from None
        return formats.decode_image(data, str(self.paths[i]), source=str(self.root))


class RecordIOFaceDataset(_FileFaceDataset):
    """insightface train.rec/train.idx, read without mxnet (one file handle per worker process)."""

    def __init__(self, spec: str | os.PathLike, *, max_bad_fraction: float | None = None):
        self.rec, self.idx = formats.recordio_paths(spec)
        keys, labels = formats.scan_recordio(self.rec, self.idx)
        self.offsets = formats.read_idx(self.idx)  # int64 array by record key, shared copy-on-write by workers
        st = self.rec.stat()
        fp = hashlib.sha256(self.idx.read_bytes())
        fp.update(f"{st.st_size}".encode())
        name = self.rec.parent.name if self.rec.name == "train.rec" else self.rec.stem
        unreadable = labels < 0
        self.keys = keys[~unreadable]
        super().__init__(name, labels[~unreadable], fp.hexdigest()[:16], max_bad_fraction)
        self._fh: Any = None
        self._pid = -1
        self.n_records = self.total = len(keys)
        for k in keys[unreadable].tolist():  # headers that do not parse: counted on open, never used
            self.bad_files[-k] = f"{self.rec} record {k}: unreadable header"
            log.warning("%s: record %d has an unreadable header; skipped", self.name, k)
        if self.bad_files:
            self._check_bad()

    def _where(self, i: int) -> str:
        return f"{self.rec} record {-i if i < 0 else int(self.keys[i])}"

    def _decode(self, i: int) -> np.ndarray:
        if self._fh is None or self._pid != os.getpid():  # never share a file position across processes
            self._fh = open(self.rec, "rb")
            self._pid = os.getpid()
        key = int(self.keys[i])
        where = f"{self.rec} record {key}"
        try:
            _, _, payload = formats.unpack_record(formats._read_record(self._fh, int(self.offsets[key])))
        except BadImage as err:
            raise BadImage(f"{where}: {err}") from None
        return formats.decode_image(payload, where, source=str(self.rec))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"] = None
        return state


# ----------------------------------------------------------------------------------------------------- open_*
def open_train_set(spec: str, *, cache_dir: str | None = None, max_bad_fraction: float | None = None) -> FaceDataset:
    """'synthfaces[:small|:tiny]', an image folder, a directory holding train.rec + train.idx, or a .rec path."""
    spec = str(spec)
    if spec.startswith("synthfaces"):
        name, settings = synthfaces.parse_spec(spec)
        data = synthfaces.load_split(settings, "train", cache_dir=cache_dir)
        return ArrayFaceDataset(name, data["images"], data["labels"],
                                synthfaces.dataset_fingerprint(settings, "train"))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FacekdError(f"train set not found: {spec} (give 'synthfaces[:small|:tiny]', an image folder, a train.rec "
                          f"directory or a .rec file)")
    if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").is_file()):
        return RecordIOFaceDataset(path, max_bad_fraction=max_bad_fraction)
    if path.is_dir():
        return FolderFaceDataset(path, max_bad_fraction=max_bad_fraction)
    raise FacekdError(f"train set {spec!r}: not 'synthfaces[:small|:tiny]', an image folder, a train.rec "
                      f"directory or a .rec file")


def open_verification_set(spec: str, *, cache_dir: str | None = None) -> VerificationSet:
    """'synthfaces[:small|:tiny]', an insightface .bin (lfw.bin, cfp_fp.bin...), or an LFW folder with pairs.txt."""
    spec = str(spec)
    if spec.startswith("synthfaces"):
        name, settings = synthfaces.parse_spec(spec)
        data = synthfaces.load_split(settings, "val", cache_dir=cache_dir)
        return VerificationSet(name, np.asarray(data["images"]), data["issame"], identities=data["identities"],
                               nfolds=settings.folds, fingerprint=synthfaces.dataset_fingerprint(settings, "val"))
    path = Path(spec).expanduser()
    if path.suffix == ".bin":
        vset = formats.read_bin(path)
        vset.fingerprint = sha256_file(path)
        return vset
    if path.is_dir() and (path / "pairs.txt").is_file():
        return formats.read_lfw(path)
    if not path.exists():
        raise FacekdError(f"verification set not found: {spec}")
    raise FacekdError(f"verification set {spec!r}: not 'synthfaces[:small|:tiny]', a .bin file or a folder with "
                      f"pairs.txt")


# ------------------------------------------------------------------------------------------------------ loader
class _FaceLoader(DataLoader):
    """A DataLoader whose worker-side FacekdError (e.g. too many bad images) reaches the caller as ONE line,
    not wrapped in the worker's traceback."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except FacekdError as err:
                lines = [ln for ln in str(err).splitlines() if ln.strip()]
                last = lines[-1] if lines else ""
                prefix = "facekd.io.FacekdError: "
                raise FacekdError(last[len(prefix):] if last.startswith(prefix) else str(err)) from None
            yield batch


def make_loader(dataset: Dataset, batch_size: int = 1, *, shuffle: bool = True, drop_last: bool = True,
                workers: int | None = None, seed: int = 0, distributed: bool = False,
                batch_sampler: Any = None, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader of (uint8 images, labels, indices) batches; normalise on the device afterwards.

    distributed=True shards with DistributedSampler (call `loader.sampler.set_epoch(epoch)` each epoch).
    `batch_sampler` (e.g. engine.trainer.StepBatchSampler, whose batches are a pure function of the step, which
    exact resume needs) replaces batch_size/shuffle/drop_last/distributed; engine.Trainer loads through here too.
    pin_memory defaults to CUDA being available.
    """
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise FacekdError(f"workers must be >= 0, got {workers}")
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    gen = torch.Generator()
    gen.manual_seed(seed)
    common = {"num_workers": workers, "pin_memory": pin, "generator": gen,
              "prefetch_factor": 4 if workers > 0 else None}
    if batch_sampler is not None:  # one pass over a finite schedule: no persistent workers to keep
        return _FaceLoader(dataset, batch_sampler=batch_sampler, **common)
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        shuffle = False
    return _FaceLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                       persistent_workers=workers > 0, **common)



# ---------------------------------------------------------------------------------------------------------- CLI
@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m facedata.datasets",
                                description="Inspect a face dataset: size, classes, fingerprint, decode rate.")
    p.add_argument("spec", help="train spec (synthfaces[:size], image folder, train.rec dir) or verification "
                                "spec (.bin, LFW folder) with --verification")
    p.add_argument("--verification", action="store_true", help="open SPEC as a verification set")
    p.add_argument("--decode-bench", type=int, default=0, metavar="N", help="decode N images and print images/s")
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)
    if args.verification:
        t0 = time.perf_counter()
        vs = open_verification_set(args.spec, cache_dir=args.cache_dir)
        print(json.dumps({"name": vs.name, "pairs": vs.pairs, "genuine": int(vs.issame.sum()), "nfolds": vs.nfolds,
                          "open_seconds": round(time.perf_counter() - t0, 2)}))
        return 0
    ds = open_train_set(args.spec, cache_dir=args.cache_dir)
    info: dict[str, Any] = {"name": ds.name, "images": len(ds), "classes": ds.num_classes, "fingerprint": ds.fingerprint}
    if args.decode_bench:
        n = min(args.decode_bench, len(ds))
        order = np.random.default_rng(0).permutation(len(ds))[:n]
        t0 = time.perf_counter(); c0 = time.process_time()
        for i in order.tolist():
            ds[i]
        info.update(decode_images=n, decode_images_per_s=round(n / (time.perf_counter() - t0), 1),
                    decode_cpu_ms_per_image=round((time.process_time() - c0) / n * 1e3, 3))
    info["bad_images"] = len(getattr(ds, "bad_files", {}))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
