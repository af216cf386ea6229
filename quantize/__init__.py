"""quantize: post-training int8 quantisation (onnxruntime) that makes a PReLU MobileFaceNet faster, not just smaller.

`python -m quantize.ptq` quantises a checkpoint or ONNX model and writes a fidelity report; `python -m quantize.bench`
prints every option's latency, size and fidelity side by side. `quantize.graph` holds the ONNX rewrites (PReLU as
an 8-bit Max of two convolutions), `quantize.calib` the calibration data, `quantize.bnstats` data-free calibration,
`quantize.core` the quantiser (`quantize_onnx`) and the embedding comparison the commands share.
"""
