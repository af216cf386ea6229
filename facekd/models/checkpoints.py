"""The facekd checkpoint format: safetensors weights with a JSON `facekd` header that rebuilds the model.

Also reads insightface `backbone.pth` files and resume state (`torch.load(..., weights_only=True)` only), and
loads state dicts strictly with one-line errors. Building a model from a checkpoint needs the registry:
`facekd.models.registry.load_checkpoint`.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facekd.io import FacekdError, atomic_path, provenance

CHECKPOINT_METADATA_KEY = "facekd"


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
            raise _unreadable_safetensors(path, err) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if "GLOBAL" not in detail:  # not a pickle of classes at all: a corrupt or foreign file
            raise FacekdError(f"cannot read torch checkpoint {path}: corrupt or not a torch file"
                              + (f" ({detail})" if detail else "")) from None
        raise FacekdError(f"{path} is not a plain state dict (refused by weights_only loading: {detail}); "
                          "it probably pickles a whole module - re-save it with torch.save(model.state_dict())") from None
    except Exception as err:  # noqa: BLE001 - torch.load raises whatever its unpickler trips on (KeyError, ...)
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise FacekdError(f"cannot read torch checkpoint {path}: corrupt or not a torch file "
                          f"({type(err).__name__}{': ' + reason if reason else ''})") from None
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


def _unpickler_detail(err: Exception) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load with weights_only=False
    (which would run arbitrary code from the file: never advised here)."""
    text = str(err)
    _, found, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()] if found else []
    return lines[0].split(" Please use ")[0] if lines else ""


def _unreadable_safetensors(path: Path, err: Exception) -> FacekdError:
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return FacekdError(f"cannot read safetensors checkpoint {path}: {reason} (truncated, or not a safetensors file)")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` file's header; one-line FacekdError when it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for corrupt headers
        raise _unreadable_safetensors(Path(path), err) from None


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
    meta = safetensors_metadata(path)
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
