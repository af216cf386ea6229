"""Teacher models (IResNet r18-r200, ONNX teachers incl. OpenCV SFace, dlib's ResNet); importing registers them."""
from teachers import dlib_resnet, iresnet, onnx_teacher  # noqa: F401  (registration side effects)
