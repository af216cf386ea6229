"""Model plumbing shared by every stage, by concern:

- `facekd.models.registry`: names -> models (`register_model`, `create_model`, `list_models`, the `MODEL_FAMILIES`
  plugin table), `load_checkpoint` (a model rebuilt from a checkpoint), MAC/parameter counts, `python -m teachers list`;
- `facekd.models.checkpoints`: the checkpoint format (facekd `.safetensors` with a JSON header, insightface
  `backbone.pth`, strict state-dict loading);
- `facekd.models.onnx`: ONNX export with facekd metadata, reading it back, repairing foreign files (`runnable_onnx`).

Every name is importable from `facekd.models` itself. Embedders (a model file -> images to embeddings) live one floor
up, in `evaluate.embed` (`load_embedder`; importing it from here says so).
"""
from facekd.models.checkpoints import CHECKPOINT_METADATA_KEY, load_state_dict_strict, model_description, \
    read_checkpoint_metadata, read_state_dict, save_checkpoint, state_dict_mismatch
from facekd.models.onnx import ONNX_METADATA_KEY, export_onnx, read_onnx_metadata, runnable_onnx
from facekd.models.registry import INSIGHTFACE_PREPROCESSING, MODEL_FAMILIES, ModelEntry, count_macs, count_params, \
    create_model, format_table, has_weights, list_main, list_models, load_checkpoint, model_table, preprocessing_for, \
    register_model, register_prefix, resolve_embedding_dim

__all__ = [
    "CHECKPOINT_METADATA_KEY", "INSIGHTFACE_PREPROCESSING", "MODEL_FAMILIES", "ModelEntry", "ONNX_METADATA_KEY",
    "count_macs", "count_params", "create_model", "export_onnx", "format_table", "has_weights", "list_main", "list_models",
    "load_checkpoint", "load_state_dict_strict", "model_description", "model_table", "preprocessing_for",
    "read_checkpoint_metadata", "read_onnx_metadata", "read_state_dict", "register_model", "register_prefix",
    "resolve_embedding_dim", "runnable_onnx", "save_checkpoint", "state_dict_mismatch",
]


def __getattr__(name: str):
    if name == "load_embedder":  # moved up a floor: facekd never imports evaluate
        raise ImportError("facekd.models.load_embedder moved to evaluate.embed.load_embedder")
    raise AttributeError(f"module 'facekd.models' has no attribute {name!r}")
