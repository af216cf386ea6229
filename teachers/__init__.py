"""Teacher models (IResNet r18-r200, ONNX teachers incl. OpenCV SFace); importing registers them."""
from teachers import iresnet, onnx_teacher  # noqa: F401  (registration side effects)
