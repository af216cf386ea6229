"""Real face-data formats, read and written without their original frameworks.

- image folder: one sub-folder per identity (labels by sorted folder name), e.g. aligned CASIA-WebFace;
- insightface MXNet RecordIO: `train.rec` + `train.idx` (dmlc record framing, `IRHeader` 'IfQQ'), read like
  insightface's `MXFaceDataset` without mxnet;
- insightface `.bin` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin): a pickle of (image bytes, issame),
  read through a restricted unpickler that refuses every global except the few a genuine file needs;
- LFW-style folder: `pairs.txt` + `name/name_%04d.jpg`.

Each reader has a writer, so tests round-trip real-format files and SynthFaces can be exported in every format.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from facekd.io import FacekdError, atomic_path

log = logging.getLogger("facedata")

SIZE = 112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass
class VerificationSet:
    """Pairs of images: images[2k] and images[2k+1] form pair k; issame[k] says whether they show one person.

    `identities` (one per image, optional) and `nfolds` (folds of consecutive pairs) travel when the source has them.
    """

    name: str
    images: np.ndarray   # uint8 (2P, 112, 112, 3) RGB
    issame: np.ndarray   # bool (P,)
    identities: np.ndarray | None = None
    nfolds: int = 10
    fingerprint: str | None = None  # of the content, when the source has a cheap one (evaluation caches key on it)

    def __post_init__(self) -> None:
        self.issame = np.asarray(self.issame, dtype=bool)
        if self.images.ndim != 4 or self.images.shape[1:] != (SIZE, SIZE, 3) or self.images.dtype != np.uint8:
            raise FacekdError(f"verification set {self.name}: images must be uint8 (N, 112, 112, 3), "
                              f"got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != 2 * len(self.issame):
            raise FacekdError(f"verification set {self.name}: {len(self.images)} images for {len(self.issame)} pairs "
                              f"(need exactly 2 per pair)")

    @property
    def pairs(self) -> int:
        return len(self.issame)


# ------------------------------------------------------------------------------------------------------ decoding
class BadImage(Exception):
    """An image that cannot be decoded (internal; datasets count these and decide)."""


_resize_logged: set[str] = set()


def decode_image(data: bytes, where: str = "", *, source: str = "") -> np.ndarray:
    """Encoded bytes -> uint8 RGB (112, 112, 3); other sizes are resized bilinearly (logged once per `source`)."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and (img.width > 2 * SIZE or img.height > 2 * SIZE):
            img.draft("RGB", (SIZE, SIZE))  # DCT-domain downscale: much cheaper decode of large JPEGs
        img = img.convert("RGB")
        if img.size != (SIZE, SIZE):
            key = source or where
            if key not in _resize_logged:
                _resize_logged.add(key)
                log.warning("%s: images are %dx%d, resizing to 112x112 (bilinear); faces should be aligned first "
                            "(facedata.transforms.align_face)", key, img.width, img.height)
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadImage(f"{where}: {type(err).__name__}: {err}") from None


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    elif image_format in ("jpg", "jpeg"):
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    else:
        raise FacekdError(f"image format {image_format!r}: choose png or jpg")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ folders
def scan_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, labels, class names) of an identity-per-sub-folder tree; labels follow sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FacekdError(f"image folder not found: {root}")
    names, paths, labels = [], [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            continue  # an empty folder is no identity (logged: the class count must not surprise anyone)
        paths += files
        labels += [len(names)] * len(files)
        names.append(sub.name)
    if not paths:
        raise FacekdError(f"no images under {root} (expected one sub-folder per identity with {'/'.join(IMAGE_EXTENSIONS)} files)")
    skipped = sum(1 for p in root.iterdir() if p.is_dir()) - len(names)
    if skipped:
        log.warning("%s: %d sub-folders without images were skipped", root, skipped)
    return paths, np.asarray(labels, dtype=np.int64), names


def write_folder(out: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *, image_format: str = "png",
                 names: Sequence[str] | None = None) -> Path:
    """Write images as out/<identity>/<index>.<ext> (identity names sort like the labels)."""
    out = Path(out)
    ext = "jpg" if image_format in ("jpg", "jpeg") else "png"
    counts: dict[int, int] = {}
    for img, lab in zip(images, np.asarray(labels).tolist()):
        name = names[lab] if names is not None else f"id{lab:06d}"
        k = counts.get(lab, 0); counts[lab] = k + 1
        path = out / name / f"{k:04d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(np.asarray(img), image_format))
    return out


# ----------------------------------------------------------------------------------------------------- RecordIO
RECORDIO_MAGIC = 0xCED7230A
_IR_FORMAT = "<IfQQ"          # IRHeader(flag, label, id, id2), as mxnet.recordio packs it
_IR_SIZE = struct.calcsize(_IR_FORMAT)


def _read_record(fh, offset: int) -> bytes:
    """One dmlc record at `offset`; multi-part records (cflag 1/2/3) are re-joined with the magic between parts."""
    fh.seek(offset)
    parts = []
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise BadImage(f"offset {offset}: truncated record header")
        magic, lrec = struct.unpack("<II", head)
        if magic != RECORDIO_MAGIC:
            raise BadImage(f"offset {offset}: bad magic 0x{magic:08x}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        data = fh.read(length)
        if len(data) < length:
            raise BadImage(f"offset {offset}: truncated record ({len(data)} of {length} bytes)")
        fh.read((4 - length % 4) % 4)
        parts.append(data)
        if cflag in (0, 3):
            return struct.pack("<I", RECORDIO_MAGIC).join(parts)


def unpack_record(record: bytes) -> tuple[int, Any, bytes]:
    """(flag, label, payload): label is a float, or a float32 array when flag > 0 (mxnet.recordio.unpack)."""
    if len(record) < _IR_SIZE:
        raise BadImage(f"record of {len(record)} bytes is shorter than its IRHeader")
    flag, label, _id, _id2 = struct.unpack(_IR_FORMAT, record[:_IR_SIZE])
    payload = record[_IR_SIZE:]
    if flag > 0:
        label = np.frombuffer(payload[:4 * flag], dtype=np.float32)
        payload = payload[4 * flag:]
    return flag, label, payload


def pack_record(label: float | Sequence[float], payload: bytes, idx: int = 0) -> bytes:
    if isinstance(label, (int, float, np.floating, np.integer)):
        return struct.pack(_IR_FORMAT, 0, float(label), idx, 0) + payload
    arr = np.asarray(label, dtype=np.float32)
    return struct.pack(_IR_FORMAT, arr.size, 0.0, idx, 0) + arr.tobytes() + payload


def _frame(data: bytes) -> bytes:
    if len(data) >= 1 << 29:
        raise FacekdError("record too large for RecordIO (>= 512 MiB)")
    # dmlc splits a record where the magic appears at an aligned position; we write such records in parts too
    magic = struct.pack("<I", RECORDIO_MAGIC)
    cuts = [i for i in range(0, len(data) - 3, 4) if data[i:i + 4] == magic]
    if not cuts:
        return struct.pack("<II", RECORDIO_MAGIC, len(data)) + data + b"\0" * ((4 - len(data) % 4) % 4)
    out, start = [], 0
    pieces = []
    for c in cuts:
        pieces.append(data[start:c]); start = c + 4
    pieces.append(data[start:])
    for k, piece in enumerate(pieces):
        cflag = 1 if k == 0 else (3 if k == len(pieces) - 1 else 2)
        out.append(struct.pack("<II", RECORDIO_MAGIC, (cflag << 29) | len(piece)) + piece
                   + b"\0" * ((4 - len(piece) % 4) % 4))
    return b"".join(out)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Record offsets of an insightface .idx, indexed by record key (int64; -1 where the file has no such key).

    One numpy array instead of a dict of Python ints: MS1MV3's 5.2M records take 42 MB, shared copy-on-write by
    DataLoader workers (a dict's refcounts would make every worker copy its pages)."""
    raw = Path(path).read_bytes()
    tokens = raw.split()
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    try:
        if len(tokens) != 2 * len(lines):
            raise ValueError
        pairs = np.array(tokens).astype(np.int64).reshape(-1, 2) if tokens else np.zeros((0, 2), np.int64)
    except ValueError:  # find the line to name
        for n, line in enumerate(raw.decode("ascii", "replace").splitlines(), 1):
            parts = line.split("\t")
            if line.strip() and (len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts)):
                raise FacekdError(f"{path}:{n}: not an 'index<TAB>offset' line: {line.strip()[:60]!r}") from None
        raise FacekdError(f"{path}: not an insightface .idx (index<TAB>offset lines)") from None
    keys, offsets = pairs[:, 0], pairs[:, 1]
    if len(keys) and (keys.min() < 0 or keys.max() > 4 * len(keys) + (1 << 20)):
        raise FacekdError(f"{path}: record keys {int(keys.min())}..{int(keys.max())} for {len(keys)} records; "
                          f"insightface keys run from 0 without large gaps")
    index = np.full(int(keys.max()) + 1 if len(keys) else 0, -1, dtype=np.int64)
    index[keys] = offsets
    return index


def recordio_paths(spec: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(spec)
    rec = p / "train.rec" if p.is_dir() else p
    idx = rec.with_suffix(".idx")
    if not rec.is_file():
        raise FacekdError(f"RecordIO file not found: {rec}")
    if not idx.is_file():
        raise FacekdError(f"RecordIO index not found: {idx} (insightface ships train.rec with train.idx)")
    return rec, idx


def scan_recordio(rec: Path, idx: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image record keys, labels) following insightface MXFaceDataset: header record 0 with flag > 0 gives
    image keys 1 .. label[0]-1; otherwise every key is an image."""
    index = read_idx(idx)
    with open(rec, "rb") as fh:
        if len(index) and index[0] >= 0:
            try:
                flag, label, _ = unpack_record(_read_record(fh, index[0]))
            except BadImage as err:
                raise FacekdError(f"{rec}: unreadable header record 0 ({err})") from None
        else:
            flag, label = 0, 0.0
        if flag > 0 and len(label) == 0:
            raise FacekdError(f"{rec}: header record 0 has flag {flag} but no label (expected the image key range)")
        keys = np.arange(1, int(label[0]), dtype=np.int64) if flag > 0 else np.flatnonzero(index >= 0)
        missing = keys[(keys >= len(index)) | (index[np.minimum(keys, len(index) - 1)] < 0)].tolist()
        if missing:
            raise FacekdError(f"{idx}: header says images 1..{int(label[0]) - 1} but {len(missing)} key(s) are "
                              f"missing from the index, e.g. {missing[:5]}")
        labels = np.empty(len(keys), dtype=np.int64)
        for n, k in enumerate(keys.tolist()):
            fh.seek(int(index[k]))
            head = fh.read(8 + _IR_SIZE + 4)
            try:
                magic, lrec = struct.unpack("<II", head[:8])
                if magic != RECORDIO_MAGIC:
                    raise ValueError("bad magic")
                if lrec >> 29:  # a multi-part record: its header may be split, read it whole
                    flag_k, lab, _ = unpack_record(_read_record(fh, int(index[k])))
                    labels[n] = int(lab[0]) if flag_k > 0 else int(lab)
                    continue
                flag_k, lab, _, _ = struct.unpack(_IR_FORMAT, head[8:8 + _IR_SIZE])
                labels[n] = int(struct.unpack("<f", head[8 + _IR_SIZE:])[0]) if flag_k > 0 else int(lab)
            except (struct.error, ValueError, BadImage):
                labels[n] = -1  # decided at read time (counted as a bad image)
    return keys, labels


def write_recordio(out: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *, image_format: str = "jpg",
                   quality: int = 95) -> Path:
    """insightface layout: record 0 = header (flag 2, label (N+1, N+1+C)), records 1..N = images (float label),
    then one record per identity with label (first, last+1) image keys, as the insightface im2rec tool writes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, dtype=np.int64)
    n, classes = len(labels), int(labels.max()) + 1 if len(labels) else 0
    index_lines = []
    with atomic_path(out / "train.rec") as tmp, open(tmp, "wb") as fh:
        def put(key: int, rec: bytes) -> None:
            index_lines.append(f"{key}\t{fh.tell()}\n")
            fh.write(_frame(rec))

        put(0, pack_record([n + 1, n + 1 + classes], b""))
        for k, (img, lab) in enumerate(zip(images, labels.tolist()), 1):
            put(k, pack_record(float(lab), encode_image(np.asarray(img), image_format, quality), idx=k))
        for c in range(classes):
            where = np.flatnonzero(labels == c) + 1
            put(n + 1 + c, pack_record([where.min(), where.max() + 1] if len(where) else [0, 0], b""))
    with atomic_path(out / "train.idx") as tmp:
        tmp.write_text("".join(index_lines), encoding="ascii")
    (out / "property").write_text(f"{classes},{SIZE},{SIZE}\n")
    return out


# ---------------------------------------------------------------------------------------------------- .bin files
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles made by Python 3 store bytes as _codecs.encode(text, 'latin1'); nothing else is allowed
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} refused")
    return text.encode("latin1")


def _numpy_bool_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if spec not in ("b1", b"b1", "?"):
        raise pickle.UnpicklingError(f"numpy.dtype({spec!r}) refused (only 'b1' booleans)")
    return np.dtype(bool)


def _numpy_bool_scalar(dtype: Any, data: Any = b"") -> np.bool_:
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(bool):
        raise pickle.UnpicklingError("numpy scalar of a non-boolean dtype refused")
    raw = data.encode("latin1") if isinstance(data, str) else data
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 1:
        raise pickle.UnpicklingError("malformed numpy boolean scalar")
    return np.bool_(raw[0] != 0)


def _bytearray(source: Any = b"", *args: Any) -> bytearray:
    # a genuine .bin rebuilds bytearrays from their own bytes; bytearray(n) would let a tiny file ask for any size
    if not isinstance(source, (bytes, bytearray, str)):
        raise pickle.UnpicklingError(f"bytearray({type(source).__name__}) refused (only bytearray(bytes) is allowed)")
    return bytearray(source, *args)


def _check_pickle_lengths(data: bytes) -> None:
    """Every length a pickle opcode claims must fit in the data. The C unpickler allocates a counted bytes/str
    before reading it, so a 20-byte file claiming 2**44 bytes would end in MemoryError; pickletools reads each
    argument and stops at the end of the data instead. With bytearray(n) refused and every list item an opcode,
    nothing the unpickler builds is then larger than a small multiple of the file."""
    import pickletools

    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError as err:
        raise pickle.UnpicklingError(str(err)) from None


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _numpy_bool_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_bool_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_bool_scalar,
    ("__builtin__", "bytearray"): _bytearray, ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bool"): bool, ("builtins", "bool"): bool,
}


class _BinUnpickler(pickle.Unpickler):
    """Only bytes/bytearray, lists, tuples, bools, ints and numpy bools can come out of an insightface .bin."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def load_bin_pickle(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"verification .bin not found: {path}")
    try:
        data = path.read_bytes()
        _check_pickle_lengths(data)
        obj = _BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise FacekdError(f"{path}: unsafe or malformed pickle ({err}); an insightface .bin holds only "
                          f"(list of image bytes, list of bool)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, struct.error) as err:
        raise FacekdError(f"{path}: not a readable insightface .bin ({type(err).__name__}: {err})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise FacekdError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not all(isinstance(b, (bytes, bytearray)) for b in bins):
        raise FacekdError(f"{path}: image entries must be encoded bytes")
    if not all(isinstance(s, (bool, np.bool_, int)) for s in issame):
        raise FacekdError(f"{path}: issame entries must be booleans")
    return [bytes(b) for b in bins], [bool(s) for s in issame]


def _decode_all(blobs: Iterable[tuple[str, bytes]], source: str) -> np.ndarray:
    images, bad = [], []
    for where, data in blobs:
        try:
            images.append(decode_image(data, where, source=source))
        except BadImage as err:
            bad.append(str(err))
            images.append(np.zeros((SIZE, SIZE, 3), np.uint8))
    if bad:
        # a verification pair without its image cannot be scored, and dropping it would change the benchmark
        raise FacekdError(f"{source}: {len(bad)} unreadable image(s) in a verification set: {'; '.join(bad[:3])}")
    return np.stack(images) if images else np.zeros((0, SIZE, SIZE, 3), np.uint8)


def read_bin(path: str | os.PathLike, name: str | None = None) -> VerificationSet:
    bins, issame = load_bin_pickle(path)
    if len(bins) != 2 * len(issame):
        raise FacekdError(f"{path}: {len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)")
    images = _decode_all(((f"{path}[{k}]", b) for k, b in enumerate(bins)), str(path))
    return VerificationSet(name or Path(path).stem, images, np.asarray(issame, dtype=bool))


def write_bin(path: str | os.PathLike, vs: VerificationSet, *, image_format: str = "jpg", quality: int = 95,
              protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    """Write (list of encoded images, list of bool) like insightface's tools do."""
    bins = [encode_image(img, image_format, quality) for img in vs.images]
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        pickle.dump((bins, [bool(s) for s in vs.issame]), fh, protocol=protocol)
    return path


# ---------------------------------------------------------------------------------------------------------- LFW
def _lfw_image_root(root: Path, first_name: str) -> Path:
    """Images live beside pairs.txt or in a sub-folder such as lfw/ or lfw-deepfunneled/ (the official layout)."""
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("lfw"))]
    return next((c for c in candidates if (c / first_name).is_dir()), root)


def read_lfw(root: str | os.PathLike, name: str | None = None) -> VerificationSet:
    """LFW layout: root/pairs.txt ('folds n' header; 'name i j' genuine, 'a i b j' impostor), images at
    <root>/<name>/<name>_<i:04d>.jpg (or .png)."""
    root = Path(root)
    pairs_txt = root / "pairs.txt"
    if not pairs_txt.is_file():
        raise FacekdError(f"LFW folder {root} has no pairs.txt")
    lines = [ln.split() for ln in pairs_txt.read_text().splitlines() if ln.strip()]
    try:
        head = [int(v) for v in lines[0]]
        nfolds = head[0] if len(head) == 2 else 1
        per = head[-1]
    except (ValueError, IndexError):
        raise FacekdError(f"{pairs_txt}: first line must be '<folds> <pairs per class per fold>', e.g. '10 300'") from None
    refs, issame = [], []
    for n, tok in enumerate(lines[1:], 2):
        try:
            if len(tok) == 3:
                refs += [(tok[0], int(tok[1])), (tok[0], int(tok[2]))]; issame.append(True)
            elif len(tok) == 4:
                refs += [(tok[0], int(tok[1])), (tok[2], int(tok[3]))]; issame.append(False)
            else:
                raise ValueError
        except ValueError:
            raise FacekdError(f"{pairs_txt}:{n}: expected 'name i j' or 'name1 i name2 j', got {' '.join(tok)!r}") from None
    if not refs:
        raise FacekdError(f"{pairs_txt}: no pairs listed")
    img_root = _lfw_image_root(root, refs[0][0])
    if len(issame) != nfolds * 2 * per:
        raise FacekdError(f"{pairs_txt}: header promises {nfolds} x 2 x {per} pairs but lists {len(issame)}")
    cache: dict[tuple[str, int], bytes] = {}

    def blobs():
        for who, k in refs:
            if (who, k) not in cache:
                base = img_root / who / f"{who}_{k:04d}"
                path = next((base.with_suffix(e) for e in (".jpg", ".png", ".jpeg") if base.with_suffix(e).is_file()),
                            None)
                if path is None:
                    raise FacekdError(f"LFW image missing: {base}.jpg (listed in {pairs_txt})")
                cache[(who, k)] = path.read_bytes()
            yield f"{img_root / who}/{who}_{k:04d}", cache[(who, k)]

    images = _decode_all(blobs(), str(root))
    names = sorted({w for w, _ in refs})
    ids = np.asarray([names.index(w) for w, _ in refs], dtype=np.int64)
    return VerificationSet(name or root.name, images, np.asarray(issame), identities=ids, nfolds=nfolds)


def write_lfw(out: str | os.PathLike, vs: VerificationSet, *, image_format: str = "jpg", quality: int = 95) -> Path:
    """Write pairs.txt + name/name_%04d.<ext>; pairs keep their order (so folds stay consecutive pairs)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if image_format in ("jpg", "jpeg") else "png"
    if vs.pairs % (2 * vs.nfolds):
        raise FacekdError(f"{vs.name}: {vs.pairs} pairs do not split into {vs.nfolds} folds of equal halves")
    if vs.identities is not None:
        who = [f"id{int(i):05d}" for i in vs.identities]
    else:  # no identities known: a genuine pair shares a name, impostors get two
        who = [f"p{k // 2:05d}" + ("" if vs.issame[k // 2] or k % 2 == 0 else "b") for k in range(len(vs.images))]
    counter: dict[str, int] = {}
    lines = [f"{vs.nfolds} {vs.pairs // (2 * vs.nfolds)}"]
    numbers = []
    for k, img in enumerate(vs.images):
        n = counter.get(who[k], 0) + 1; counter[who[k]] = n
        numbers.append(n)
        path = out / who[k] / f"{who[k]}_{n:04d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(img, image_format, quality))
    for p, same in enumerate(vs.issame):
        a, b = 2 * p, 2 * p + 1
        if same:
            if who[a] != who[b]:
                raise FacekdError(f"{vs.name}: genuine pair {p} has two different identities")
            lines.append(f"{who[a]}\t{numbers[a]}\t{numbers[b]}")
        else:
            lines.append(f"{who[a]}\t{numbers[a]}\t{who[b]}\t{numbers[b]}")
    (out / "pairs.txt").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":  # the dataset-inspection command moved beside the openers it needs
    import sys

    print("error: dataset inspection moved: python -m facedata.datasets SPEC [--verification] [--decode-bench N]",
          file=sys.stderr)
    raise SystemExit(2)
