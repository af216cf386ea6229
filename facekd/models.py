"""Model plumbing shared by every stage: registry, checkpoints, insightface loading, ONNX export, MAC counting.

Definitions live in `teachers/` and `students/`; each module registers its builders with `register_model`, and
`create_model` imports both packages lazily so a name resolves from anywhere. Names with a prefix
(`timm:resnet18`, `onnx:/path/model.onnx`) go to a prefix builder registered with `register_prefix`.

Every model built here carries `embedding_dim`, `input_size` (H, W) and `preprocessing` (plain data, see
docs/design.md), plus `arch` and `model_kwargs` (what rebuilds it), so checkpoints and ONNX files describe
themselves and rebuild without pickles.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from facedata.transforms import INSIGHTFACE_PREPROCESSING  # the one default (RGB, (x - 127.5) / 127.5)
from facekd.io import FacekdError, atomic_path, provenance

ONNX_METADATA_KEY = "facekd"
CHECKPOINT_METADATA_KEY = "facekd"


def preprocessing_for(input_size: tuple[int, int] | list[int], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The insightface normalisation (or `base`) at `input_size` (H, W)."""
    pre = copy.deepcopy(base or INSIGHTFACE_PREPROCESSING)
    pre["input_size"] = [int(input_size[0]), int(input_size[1])]
    return pre


def resolve_embedding_dim(num_features: int, embedding_dim: int | None, default: int = 512) -> int:
    """insightface builders say `num_features`; facekd says `embedding_dim` everywhere. Accept either."""
    if embedding_dim is not None and num_features not in (default, embedding_dim):
        raise FacekdError(f"num_features={num_features} and embedding_dim={embedding_dim} disagree; give one")
    return int(embedding_dim if embedding_dim is not None else num_features)


# ----------------------------------------------------------------------------------------------- registry

@dataclass
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    kind: str
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}
_PREFIXES: dict[str, ModelEntry] = {}
_KINDS = ("teacher", "student", "any")


def register_model(name: str, *, kind: str = "teacher", **default_kwargs: Any) -> Callable:
    """Decorator: register `builder(**kwargs) -> nn.Module` under `name` with default kwargs."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelEntry(name, builder, kind, dict(default_kwargs))
        return builder

    return decorate


def register_prefix(prefix: str, *, kind: str = "any") -> Callable:
    """Decorator: `builder(rest: str, **kwargs)` serves every name `prefix:rest`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _PREFIXES[prefix] = ModelEntry(prefix, builder, kind)
        return builder

    return decorate


def _populate() -> None:
    for package in ("teachers", "students"):
        importlib.import_module(package)


def list_models(kind: str | None = None) -> list[str]:
    """Registered names (prefix families such as `timm:` and `onnx:` are not listed), optionally of one kind."""
    _populate()
    if kind is not None and kind not in _KINDS:
        raise FacekdError(f"unknown model kind {kind!r}; choose one of: teacher, student")
    return [n for n, e in _REGISTRY.items() if kind is None or e.kind in (kind, "any")]


def _entry(name: str) -> tuple[ModelEntry, str | None]:
    _populate()
    if name in _REGISTRY:
        return _REGISTRY[name], None
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _PREFIXES:
        return _PREFIXES[prefix], rest
    known = ", ".join(sorted(_REGISTRY)) + ", " + ", ".join(f"{p}:NAME" for p in sorted(_PREFIXES))
    raise FacekdError(f"unknown model {name!r}; known: {known}")


def create_model(name: str, *, checkpoint_path: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; with `checkpoint_path`, load weights (facekd checkpoint or insightface .pth).

    For `timm:NAME`, `pretrained=True` is accepted only together with `checkpoint_path` (a local timm weight
    file for the backbone); nothing is ever downloaded.
    """
    entry, rest = _entry(name)
    merged = {**entry.defaults, **kwargs}
    if rest is not None and merged.get("pretrained"):
        if checkpoint_path is None:
            raise FacekdError(f"{name}: pretrained=True would download weights; pass checkpoint_path=LOCAL_FILE "
                              "(nothing is ever downloaded)")
        merged["pretrained_file"] = str(checkpoint_path)
        checkpoint_path = None
    try:
        model = entry.builder(rest, **merged) if rest is not None else entry.builder(**merged)
    except TypeError as err:  # an unknown keyword: say which model and which arguments
        if "keyword argument" not in str(err):
            raise
        raise FacekdError(f"cannot build {name!r} with {sorted(kwargs)}: {err}") from None
    model.arch = name
    # What rebuilds the architecture; pretrained weights travel in the checkpoint, not in kwargs.
    model.model_kwargs = {k: v for k, v in merged.items() if k not in ("pretrained", "pretrained_file")}
    for attr in ("embedding_dim", "input_size", "preprocessing"):
        if not hasattr(model, attr):
            raise TypeError(f"model builder for {name!r} must set .{attr}")
    if checkpoint_path is not None:
        state = read_state_dict(checkpoint_path)
        load_state_dict_strict(model, state, str(checkpoint_path))
    return model


# ----------------------------------------------------------------------------------------------- state dicts

def _shape(t: Any) -> list[int]:
    return list(t.shape) if hasattr(t, "shape") else []


def _clip(items: list[str], limit: int = 6) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... {len(items) - limit} more"


def state_dict_mismatch(model: nn.Module, state_dict: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrongly-shaped) keys of `state_dict` against `model`; all empty when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shaped = [f"{k} {_shape(state_dict[k])} vs model {_shape(v)}" for k, v in expected.items()
              if k in state_dict and _shape(state_dict[k]) != _shape(v)]
    return missing, unexpected, shaped


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Any], source: str) -> nn.Module:
    """Load every tensor or raise one line naming missing, unexpected and wrongly-shaped keys (with counts)."""
    missing, unexpected, shaped = state_dict_mismatch(model, state_dict)
    if missing or unexpected or shaped:
        arch = getattr(model, "arch", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_clip(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_clip(unexpected)})")
        if shaped:
            parts.append(f"{len(shaped)} wrongly shaped ({_clip(shaped, 4)})")
        raise FacekdError(f"{source} does not fit model {arch}: " + "; ".join(parts)
                          + " - is it the right --arch / kwargs?")
    model.load_state_dict(state_dict, strict=True)
    return model


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a facekd `.safetensors` checkpoint or a torch file (insightface `backbone.pth`, resume state).

    Torch files load with `weights_only=True`; a pickled full module is refused with a one-line explanation.
    Nested dicts (`state_dict_backbone` of insightface resume files, `model`, `state_dict`) and DDP `module.`
    prefixes are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # corrupt header or truncated file
            raise FacekdError(f"cannot read safetensors checkpoint {path}: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).strip().splitlines()
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), None)
        if detail is None:  # not a pickle of classes at all: a corrupt or foreign file
            raise FacekdError(f"cannot read torch checkpoint {path}: corrupt or not a torch file "
                              f"({lines[0] if lines else 'unpickling failed'})") from None
        raise FacekdError(f"{path} is not a plain state dict (refused by weights_only loading: {detail.strip()}); "
                          "it probably pickles a whole module - re-save it with torch.save(model.state_dict())") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise FacekdError(f"cannot read torch checkpoint {path}: {str(err).splitlines()[0] if str(err) else err!r}") from None
    if isinstance(obj, nn.Module):
        raise FacekdError(f"{path} holds a whole module, not a state dict; re-save with torch.save(model.state_dict())")
    if not isinstance(obj, dict):
        raise FacekdError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict_backbone", "model", "state_dict", "backbone"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise FacekdError(f"{path} holds no tensors (keys: {_clip(sorted(map(str, obj)))})")
    return _strip_prefix(_strip_prefix(tensors, "module."), "_orig_mod.")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 26)


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON header of a facekd `.safetensors` checkpoint (arch, kwargs, embedding_dim, preprocessing, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"checkpoint not found: {path}")
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:
        raise FacekdError(f"cannot read safetensors checkpoint {path}: {err}") from None
    if CHECKPOINT_METADATA_KEY not in meta:
        raise FacekdError(f"{path} is a safetensors file without facekd metadata; pass --arch to load it as raw weights")
    try:
        return json.loads(meta[CHECKPOINT_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise FacekdError(f"{path}: facekd metadata is not valid JSON: {err}") from None


# ----------------------------------------------------------------------------------------------- checkpoints

def model_description(model: nn.Module, *, arch: str | None = None, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Arch, kwargs (with current pruned channel widths), embedding dim, input size and preprocessing of `model`."""
    arch = arch or getattr(model, "arch", None)
    if arch is None:
        raise FacekdError("model has no recorded arch; pass arch= (a registered model name)")
    kwargs = dict(getattr(model, "model_kwargs", {}) if kwargs is None else kwargs)
    if hasattr(model, "channel_config") and hasattr(model, "base_channels"):
        # A pruned model rebuilds from its current widths; an unpruned one keeps its kwargs clean.
        channels = model.channel_config()
        if channels != model.base_channels or "channels" in kwargs:
            kwargs["channels"] = channels
    return {
        "arch": arch,
        "kwargs": kwargs,
        "embedding_dim": int(model.embedding_dim),
        "input_size": [int(s) for s in model.input_size],
        "preprocessing": model.preprocessing,
    }


def save_checkpoint(model: nn.Module, path: str | Path, *, arch: str | None = None,
                    kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write weights as safetensors with a JSON `facekd` header that rebuilds the model (atomic write).

    `arch`/`kwargs` default to what `create_model` recorded on the model; a pruned MobileFaceNet's current
    channel widths are written into `kwargs["channels"]` automatically.
    """
    from safetensors.torch import save_file

    path = Path(path)
    header = model_description(model, arch=arch, kwargs=kwargs)
    header["params"] = sum(p.numel() for p in model.parameters())
    header["provenance"] = provenance()
    header.update(extra or {})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CHECKPOINT_METADATA_KEY: json.dumps(header, sort_keys=True)})
    return path


def load_checkpoint(path: str | Path, *, arch: str | None = None, **kwargs: Any) -> nn.Module:
    """A model in eval mode from a facekd checkpoint, or from an insightface `backbone.pth` given `arch`.

    For facekd checkpoints `arch` defaults to the recorded one and `kwargs` override the recorded kwargs.
    """
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as fh:
            has_meta = CHECKPOINT_METADATA_KEY in (fh.metadata() or {})
        if has_meta:
            meta = read_checkpoint_metadata(path)
            if arch is not None and arch != meta["arch"]:
                raise FacekdError(f"{path} holds a {meta['arch']!r} model, not {arch!r}")
            arch, kwargs = meta["arch"], {**meta.get("kwargs", {}), **kwargs}
    if arch is None:
        raise FacekdError(f"{path} has no facekd metadata; say which architecture it is (--arch, e.g. r100, r50, mbf)")
    model = create_model(arch, **kwargs)
    load_state_dict_strict(model, read_state_dict(path), str(path))
    return model.eval()


# ----------------------------------------------------------------------------------------------- measuring

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int] | None = None) -> int:
    """Multiply-adds of one image through `model`: `FlopCounterMode` FLOPs / 2 (conv, linear, matmul only).

    Runs on meta tensors when the model lives on the meta device (no memory, no compute), else on one real
    zero image without gradients.
    """
    from torch.utils.flop_counter import FlopCounterMode

    h, w = input_size or model.input_size
    with _evaluating(model) as device, torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, h, w, device=device))
    return int(counter.get_total_flops() // 2)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode inside the block, the previous mode after it; yields the device of the model's parameters."""
    param = next(iter(model.parameters()), None)
    was_training = model.training
    model.eval()
    try:
        yield param.device if param is not None else torch.device("cpu")
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------- ONNX

def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17, metadata: dict[str, Any] | None = None) -> Path:
    """Export to ONNX with a dynamic batch axis (input `input`, output `embedding`) and facekd metadata.

    Uses the TorchScript exporter (`dynamo=False`): it is several times faster than the dynamo exporter on
    these CNNs and folds BatchNorm into the preceding conv in eval mode, like onnxruntime would. The
    `facekd` metadata_props entry is JSON with arch, kwargs, embedding_dim, input_size, preprocessing (+ `metadata`).
    """
    import onnx
    import warnings

    path = Path(path)
    description = model_description(model) if getattr(model, "arch", None) else {
        "arch": type(model).__name__, "kwargs": {}, "embedding_dim": int(model.embedding_dim),
        "input_size": list(model.input_size), "preprocessing": model.preprocessing}
    description.update(metadata or {})
    h, w = model.input_size
    with _evaluating(model) as device, atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, h, w, device=device),), str(tmp), input_names=["input"],
                          output_names=["embedding"], dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(description, sort_keys=True)
        proto.producer_name = "facekd"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, Any] | None:
    """The facekd JSON of an ONNX file's metadata_props, or None for a foreign ONNX model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise FacekdError(f"cannot read ONNX model {path}: {err}") from None
    for prop in proto.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return json.loads(prop.value)
    return None


# ----------------------------------------------------------------------------------------------- embedders

def load_embedder(path_or_name: str, *, arch: str | None = None, device: str = "cpu", **kwargs: Any) -> Any:
    """An `evaluate.embed` embedder (uint8 NHWC RGB -> float32 embeddings) for a model file or name.

    Accepts `.onnx` files (facekd or foreign; foreign ones use the insightface preprocessing), `onnx:PATH`
    and `sface` ONNX teachers, facekd `.safetensors` checkpoints, insightface `.pth` files (with `arch`), and
    registered names (random weights; for smoke tests). `kwargs` go to the model builder (e.g. the
    `embedding_dim` of a `.pth` whose arch default differs).
    """
    from evaluate.embed import OnnxEmbedder, TorchEmbedder
    target = str(path_or_name)
    if target.endswith(".onnx") and Path(target).is_file():
        from teachers.onnx_teacher import runnable_onnx  # repairs old exports (weights as inputs, batch fixed to 1)
        return OnnxEmbedder(runnable_onnx(target))
    if Path(target).is_file():
        model = load_checkpoint(target, arch=arch, **kwargs)
    else:
        model = create_model(target, **kwargs).eval()
    onnx_path = getattr(model, "onnx_path", None)
    if onnx_path is not None:  # an ONNX teacher: run its file directly with its own preprocessing
        return OnnxEmbedder(str(onnx_path), model.preprocessing)
    return TorchEmbedder(model, model.preprocessing, device=device)


# ----------------------------------------------------------------------------------------------- CLI tables

def model_table(kind: str) -> list[dict[str, Any]]:
    """One row per registered model of `kind`: params, MACs at its input size, embedding dim, input size.

    Models are built on the meta device (no weights allocated) so even r200 counts in about a second.
    """
    rows = []
    for name in list_models(kind):
        entry = _REGISTRY[name]
        if not getattr(entry.builder, "meta_ok", True):  # e.g. an onnxruntime teacher: real, no MAC count
            try:
                model = create_model(name)
            except FacekdError as err:
                rows.append({"name": name, "params": None, "macs": None, "embedding_dim": None,
                             "input_size": None, "note": str(err)})
                continue
            macs = None
        else:
            with torch.device("meta"):
                model = create_model(name)
            macs = count_macs(model)
        rows.append({"name": name, "params": getattr(model, "onnx_params", None) or count_params(model), "macs": macs,
                     "embedding_dim": model.embedding_dim, "input_size": list(model.input_size),
                     "note": getattr(model, "note", "")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'name':<24} {'params':>13} {'MACs':>16} {'emb':>5} {'input':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        params = f"{r['params']:,}" if r["params"] is not None else "-"
        macs = f"{r['macs']:,}" if r["macs"] is not None else "-"
        size = "x".join(map(str, r["input_size"])) if r["input_size"] else "-"
        emb = str(r["embedding_dim"]) if r["embedding_dim"] else "-"
        lines.append(f"{r['name']:<24} {params:>13} {macs:>16} {emb:>5} {size:>8}  {r.get('note') or ''}".rstrip())
    return "\n".join(lines)


def list_main(kind: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """`python -m teachers list` / `python -m students list`: the registered models of `kind` as a table."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=f"Registered {kind} models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help=f"table of registered {kind}s: params, multiply-adds, embedding dim, input size")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    rows = model_table(kind)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print("MACs: multiply-adds of one image at the model's input size (torch FlopCounterMode FLOPs / 2; "
              "conv/linear only). Also: timm:NAME and onnx:PATH.")
    return 0
