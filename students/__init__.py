"""Student models (MobileFaceNet family, insightface mbf, timm backbones); importing registers them."""
from students import mbf, mobilefacenet, timm_backbone  # noqa: F401  (registration side effects)
