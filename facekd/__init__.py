"""facekd: shared plumbing of the knowledge-distillation pipeline.

`facekd.io` (errors, atomic writes, fingerprints, command-line wrapper) is ground floor and imports no stage.
"""
__version__ = "0.1.0"
