"""facedata: SynthFaces (the embedded default dataset), readers/writers of real face-data formats, transforms
and loading.

    open_train_set("synthfaces:small")      # or an image folder, a train.rec directory, a .rec file
    open_verification_set("lfw.bin")        # or "synthfaces", an LFW folder with pairs.txt
    make_loader(dataset, 128, workers=2)    # uint8 batches; normalise on the device with transforms.normalize

Names are imported lazily so `python -m facedata.synthfaces` does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FaceDataset": "datasets", "ArrayFaceDataset": "datasets", "FolderFaceDataset": "datasets",
    "RecordIOFaceDataset": "datasets", "make_loader": "datasets", "open_train_set": "datasets",
    "open_verification_set": "datasets", "VerificationSet": "formats", "SYNTHFACES_VERSION": "synthfaces",
    "INSIGHTFACE_PREPROCESSING": "transforms", "ARCFACE_TEMPLATE": "transforms", "align_face": "transforms",
    "hflip": "transforms", "normalize": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"facedata.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'facedata' has no attribute {name!r}")
