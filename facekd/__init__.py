"""facekd: shared plumbing of the knowledge-distillation pipeline.

The ground floor: `facekd.io` (errors, atomic writes, fingerprints, command-line wrapper), `facekd.models` (registry,
checkpoint format, ONNX files) and `facekd.table` (the results table) import no other package of the project; the
registry finds `teachers` and `students` through its table of module names (`facekd.models.MODEL_FAMILIES`).
"""
__version__ = "0.1.0"
