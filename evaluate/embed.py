"""Embedders: uint8 RGB face crops in, raw embeddings out, for a torch module or an ONNX file alike.

An embedder is any callable `uint8 NHWC RGB batch (np.ndarray) -> float32 (B, D)` with `.embedding_dim`,
`.preprocessing` (plain data, docs/design.md) and `.name`. `embed_images` adds insightface's test-time recipe:
the embeddings of the image and of its horizontal flip are summed, then L2-normalised.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from facedata.transforms import INSIGHTFACE_PREPROCESSING, check_preprocessing, normalize
from facekd.io import FacekdError, atomic_path, cache_root, fingerprint, sha256_file
from facekd.models import ONNX_METADATA_KEY, create_model, export_onnx, has_weights, load_checkpoint, runnable_onnx


@runtime_checkable
class Embedder(Protocol):
    name: str
    embedding_dim: int
    preprocessing: dict[str, Any]

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def _check_images(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise FacekdError(f"images must be uint8 NHWC RGB (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _nchw_tensor(images: np.ndarray) -> torch.Tensor:
    if not images.flags.writeable or not images.flags.c_contiguous:  # e.g. a read-only memmap of a cached set
        images = np.array(images, order="C", copy=True)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


class TorchEmbedder:
    """A torch module as an embedder: normalise on `device`, forward in eval / inference mode, float32 out."""

    def __init__(self, model: torch.nn.Module, preprocessing: dict[str, Any] | None = None,
                 device: str = "cpu") -> None:
        if preprocessing is None:
            preprocessing = getattr(model, "preprocessing", None) or INSIGHTFACE_PREPROCESSING
        self.preprocessing = check_preprocessing(preprocessing)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        param = next(iter(model.parameters()), None)
        self._dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self.name = str(getattr(model, "arch", None) or type(model).__name__)
        dim = getattr(model, "embedding_dim", None)
        self.embedding_dim = int(dim) if dim is not None else self(
            np.zeros((1, *self.preprocessing["input_size"], 3), np.uint8)).shape[1]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = _check_images(images)
        with torch.inference_mode():
            x = normalize(_nchw_tensor(images).to(self.device), self.preprocessing).to(self._dtype)
            out = self.model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.reshape(len(images), -1).float().cpu().numpy()


def _onnx_metadata(session, path: Path) -> dict[str, Any]:
    """The facekd JSON of the model's metadata_props (what facekd.models.export_onnx writes), or {}."""
    text = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise FacekdError(f"{path}: metadata_props '{ONNX_METADATA_KEY}' is not valid JSON: {err}") from None
    return meta if isinstance(meta, dict) else {}


_warned_default: set[str] = set()


class OnnxEmbedder:
    """An ONNX file as an embedder (onnxruntime, CPU, NCHW float input).

    Preprocessing: `preprocessing` when given (a partial dict overrides single fields, e.g. {"channel_order": "BGR"}),
    laid over the facekd metadata of the file (`metadata_props["facekd"]`), else over the insightface default (with a
    one-time warning when the file does not say and the caller gave no complete dict). A model with a fixed batch
    size runs in chunks of that size (one at a time for batch 1, the last chunk zero-padded).
    """

    def __init__(self, path: str | Path, preprocessing: dict[str, Any] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FacekdError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for corrupt or unsupported files
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FacekdError(f"cannot read ONNX model {self.path}: {reason}") from None
        self.metadata = _onnx_metadata(self.session, self.path)
        base = self.metadata.get("preprocessing")
        complete = preprocessing is not None and {"input_size", "channel_order", "mean", "std"} <= set(preprocessing)
        if base is None and not complete and str(self.path) not in _warned_default:
            _warned_default.add(str(self.path))
            warnings.warn(f"{self.path.name} does not state its preprocessing; assuming insightface's "
                          "(RGB, (x - 127.5) / 127.5, 112x112)", stacklevel=2)
        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        if len(inp.shape) != 4:
            raise FacekdError(f"{self.path.name}: expected one NCHW image input, got {inp.name} {inp.shape}")
        batch, channels, height, width = inp.shape
        if isinstance(channels, int) and channels != 3:
            raise FacekdError(f"{self.path.name}: input {inp.name} has {channels} channels; facekd feeds NCHW RGB/BGR "
                              "with 3 channels (NHWC models are not supported)")
        fixed_size = [height, width] if isinstance(height, int) and isinstance(width, int) else None
        pre = dict(base or INSIGHTFACE_PREPROCESSING)
        if base is None and fixed_size:
            pre["input_size"] = fixed_size
        pre.update(preprocessing or {})
        self.preprocessing = check_preprocessing(pre)
        if fixed_size and fixed_size != self.preprocessing["input_size"]:
            raise FacekdError(f"{self.path.name}: model input is {fixed_size[0]}x{fixed_size[1]} but preprocessing "
                              f"says input_size {self.preprocessing['input_size']}")
        self._fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.name = str(self.metadata.get("arch") or self.path.stem)
        out = self.session.get_outputs()[0]
        dim = self.metadata.get("embedding_dim")
        if dim is None and len(out.shape) >= 2 and all(isinstance(d, int) for d in out.shape[1:]):
            dim = int(np.prod(out.shape[1:]))
        self.embedding_dim = int(dim) if dim is not None else self(
            np.zeros((1, *self.preprocessing["input_size"], 3), np.uint8)).shape[1]

    @functools.cached_property
    def cache_id(self) -> str | None:
        """What the embeddings depend on: the file's bytes and how images are fed to it (see embed_set).
        Hashed on first use, so embedders that never cache never read the file twice."""
        return fingerprint({"onnx_sha256": sha256_file(self.path), "preprocessing": self.preprocessing})

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = _check_images(images)
        x = normalize(_nchw_tensor(images), self.preprocessing).numpy().astype(self._input_dtype, copy=False)
        step = self._fixed_batch or len(x)
        outs = []
        for start in range(0, len(x), max(step, 1)):
            chunk = x[start:start + step]
            if self._fixed_batch and len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out = np.asarray(self.session.run(None, {self._input_name: chunk})[0])
            outs.append(out[: min(step, len(x) - start)].reshape(min(step, len(x) - start), -1))
        return np.concatenate(outs).astype(np.float32, copy=False) if outs else np.zeros((0, 0), np.float32)


def module_embedder(model: torch.nn.Module, preprocessing: dict[str, Any] | None = None,
                    device: str = "cpu") -> "TorchEmbedder | OnnxEmbedder":
    """The fastest embedder for a torch module: on CPU its ONNX export run by onnxruntime, else a TorchEmbedder.

    onnxruntime embeds a MobileFaceNet ~1.6x faster than eager PyTorch on CPU (130 vs 80 forward passes/s, 2 cores,
    batch 256), which is most of an evaluation's time; the export takes about a second. A module that cannot
    be exported (e.g. one wrapping an onnxruntime session) is embedded by PyTorch, with a warning.
    """
    import tempfile

    if torch.device(device).type != "cpu" or not hasattr(model, "input_size"):
        return TorchEmbedder(model, preprocessing, device=device)
    try:
        with tempfile.TemporaryDirectory(prefix="facekd-embed-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx")
            embedder = OnnxEmbedder(path, preprocessing or getattr(model, "preprocessing", None),
                                    threads=torch.get_num_threads())
    except Exception as err:  # noqa: BLE001 - any export failure: PyTorch still embeds it, only slower
        warnings.warn(f"embedding {type(model).__name__} with PyTorch: its ONNX export failed "
                      f"({str(err).splitlines()[0] if str(err) else type(err).__name__})", stacklevel=2)
        return TorchEmbedder(model, preprocessing, device=device)
    embedder.cache_id = None  # a temporary export: nothing to reuse its embeddings for
    return embedder


def load_embedder(path_or_name: str, *, arch: str | None = None, device: str = "cpu",
                  allow_random_weights: bool = False, **kwargs: Any) -> Embedder:
    """An embedder (uint8 NHWC RGB -> float32 embeddings) for a model file or name.

    Accepts `.onnx` files (facekd or foreign; foreign ones use the insightface preprocessing), `onnx:PATH`
    and `sface` ONNX teachers, facekd `.safetensors` checkpoints and insightface `.pth` files (with `arch`). A bare
    architecture name (`r100`) would embed with random weights: refused unless `allow_random_weights` (tests only).
    `kwargs` go to the model builder (e.g. the `embedding_dim` of a `.pth` whose arch default differs).
    """
    target = str(path_or_name)
    if target.endswith(".onnx") and Path(target).is_file():
        return OnnxEmbedder(runnable_onnx(target))  # repairs old exports (weights as inputs, batch fixed to 1)
    if Path(target).is_file():
        model = load_checkpoint(target, arch=arch, **kwargs)
    else:
        if not allow_random_weights and not has_weights(target):
            raise FacekdError(f"{target!r} is an architecture name, not a trained model: it would be evaluated with "
                              "random weights; pass a facekd checkpoint (.safetensors), an insightface backbone.pth "
                              f"with --arch {target}, or an ONNX file")
        model = create_model(target, **kwargs).eval()
    onnx_path = getattr(model, "onnx_path", None)
    if onnx_path is not None:  # an ONNX teacher: run its file directly with its own preprocessing
        return OnnxEmbedder(str(onnx_path), model.preprocessing)
    return TorchEmbedder(model, model.preprocessing, device=device)


def embed_set(embedder, vset: Any, *, flip: bool = True, batch_size: int = 256, progress: bool = True,
              cache: bool = False) -> np.ndarray:
    """`embed_images` of a verification set's images; with `cache`, reused from / stored in the embedding cache.

    The cache ($FACEKD_CACHE/embeddings, default ~/.cache/facekd) holds one float64 array per (model file and
    preprocessing, set content, flip), so stages that evaluate the same ONNX file on the same set (prune.run's final
    evaluation and quantize.ptq's fp32 reference) embed it once. Only embedders with a `cache_id` (ONNX files) and
    sets with a `fingerprint` take part.
    """
    set_id = getattr(vset, "fingerprint", None)
    cache_id = getattr(embedder, "cache_id", None) if cache and set_id else None
    path = None
    if cache_id:
        path = cache_root() / "embeddings" / f"{cache_id[:16]}-{set_id[:16]}-{'flip' if flip else 'noflip'}.npy"
        if path.is_file():
            try:
                emb = np.load(path)
            except (OSError, ValueError):
                emb = None  # a damaged cache entry is recomputed and replaced
            if emb is not None and emb.ndim == 2 and len(emb) == len(vset.images) and emb.dtype == np.float64:
                return emb
    emb = embed_images(embedder, vset.images, batch_size=batch_size, flip=flip, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, emb)
    return emb


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero (like sklearn.preprocessing.normalize)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def embed_images(embedder, images: np.ndarray, batch_size: int = 256, flip: bool = True,
                 progress: bool = True) -> np.ndarray:
    """(N, D) float64 L2-normalised embeddings of uint8 NHWC RGB `images`.

    With `flip` the raw embeddings of each image and of its horizontal mirror are summed before normalising
    (insightface's "Accuracy-Flip"); without it, the image alone.
    """
    from tqdm.auto import tqdm

    images = _check_images(images)
    if batch_size < 1:
        raise FacekdError(f"batch size must be >= 1, got {batch_size}")
    out: np.ndarray | None = None
    name = getattr(embedder, "name", "model")
    with tqdm(total=len(images), desc=f"embed {name}", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            emb = np.asarray(embedder(batch), dtype=np.float64)
            if flip:
                emb = emb + np.asarray(embedder(np.ascontiguousarray(batch[:, :, ::-1])), dtype=np.float64)
            if emb.ndim != 2 or len(emb) != len(batch):
                raise FacekdError(f"{name} returned embeddings of shape {emb.shape} for {len(batch)} images")
            if not np.isfinite(emb).all():
                raise FacekdError(f"{name} produced NaN/inf embeddings (images {start}..{start + len(batch) - 1})")
            if out is None:
                out = np.empty((len(images), emb.shape[1]), np.float64)
            out[start:start + len(batch)] = emb
            bar.update(len(batch))
    if out is None:
        raise FacekdError("no images to embed")
    return l2_normalize(out)
