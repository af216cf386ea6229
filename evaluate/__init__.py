"""evaluate: the verification protocol (`evaluate.metrics`), embedders (`evaluate.embed`), the verification
command (`python -m evaluate.verify`) and latency (`evaluate.latency`).

Ground floor: library code here imports no stage; only the command-line entry points resolve a MODEL argument
through `facekd.models`.
"""
