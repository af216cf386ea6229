"""evaluate: the verification protocol (`evaluate.metrics`), embedders (`evaluate.embed`, incl. `load_embedder`), the
verification command (`python -m evaluate.verify`), benchmark difficulty (`evaluate.sanity`) and latency
(`evaluate.latency`, emulated ARM cost in `evaluate.arm`).

Shared floor: imports `facekd` (models through its registry) and `facedata`, never a stage package.
"""
