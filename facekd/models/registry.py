"""The model registry: names -> models, for every stage. Also rebuilds models from checkpoints and counts MACs.

Definitions live in the model-family packages named in `MODEL_FAMILIES` (`teachers`, `students`); each module
registers its builders with `register_model`. The registry imports those packages lazily, by name, the first time a
name is resolved: the table is data, not an import, so `facekd` stays the ground floor (it never imports a stage
package) while `create_model("r100")` works from anywhere. Names with a prefix (`timm:resnet18`,
`onnx:/path/model.onnx`) go to a prefix builder registered with `register_prefix`.

Every model built here carries `embedding_dim`, `input_size` (H, W) and `preprocessing` (plain data, see
docs/design.md), plus `arch` and `model_kwargs` (what rebuilds it), so checkpoints and ONNX files describe
themselves and rebuild without pickles.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from facekd.io import FacekdError
from facekd.models.checkpoints import CHECKPOINT_METADATA_KEY, _is_safetensors, load_state_dict_strict, \
    read_checkpoint_metadata, read_state_dict, safetensors_metadata

# The one default preprocessing (RGB, (x - 127.5) / 127.5); `facedata.transforms` re-exports it.
INSIGHTFACE_PREPROCESSING: dict[str, Any] = {
    "input_size": [112, 112], "channel_order": "RGB", "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5],
}

# Plugin table: the packages whose import registers model families. Imported lazily by name (importlib), never
# statically, so the registry sits below them; a new family is one more module name here.
MODEL_FAMILIES: list[str] = ["teachers", "students"]


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
    for package in MODEL_FAMILIES:
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


def has_weights(name: str) -> bool:
    """Whether `create_model(name)` alone brings trained weights. ONNX teachers (`sface`, `onnx:PATH`) do (their
    builders set `ships_weights`); an architecture name starts from random ones, its weights come from a checkpoint."""
    entry, _ = _entry(name)
    return bool(getattr(entry.builder, "ships_weights", False))


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


# ----------------------------------------------------------------------------------------------- checkpoints

def load_checkpoint(path: str | Path, *, arch: str | None = None, **kwargs: Any) -> nn.Module:
    """A model in eval mode from a facekd checkpoint, or from an insightface `backbone.pth` given `arch`.

    For facekd checkpoints `arch` defaults to the recorded one and `kwargs` override the recorded kwargs.
    """
    path = Path(path)
    if not path.is_file():
        raise FacekdError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        if CHECKPOINT_METADATA_KEY in safetensors_metadata(path):
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


def list_main(kind: str, argv: list[str] | None = None, prog: str | None = None,
              extra: tuple[str, str, Callable[[], list[dict[str, Any]]], Callable[[list[dict[str, Any]]], str]]
              | None = None) -> int:
    """`python -m teachers list` / `python -m students list`: the registered models of `kind` as a table.

    `extra` = (key, title, rows, format): a second table printed after the models under `title` (with `--json`:
    {"models": ..., key: ...}), e.g. the teachers' shipped knowledge caches."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=f"Registered {kind} models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help=f"table of registered {kind}s: params, multiply-adds, embedding dim, input size")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    rows = model_table(kind)
    extra_rows = extra[2]() if extra else None
    if args.json:
        print(json.dumps({"models": rows, extra[0]: extra_rows} if extra else rows, indent=2))
        return 0
    print(format_table(rows))
    print("MACs: multiply-adds of one image at the model's input size (torch FlopCounterMode FLOPs / 2; "
          "conv/linear only). Also: timm:NAME and onnx:PATH.")
    if extra:
        print(f"\n{extra[1]}:\n{extra[3](extra_rows)}")
    return 0
