"""`python -m teachers.dlib_bench`: dlib_resnet's ONNX export in onnxruntime vs dlib's own CPU path, side by side."""
from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from facekd.io import FacekdError, cli_main
from teachers.dlib_resnet import dlib_model_path


def bench(images: int = 16, rounds: int = 5, threads: int = 1) -> dict[str, Any]:
    """Images/s of this model's ONNX export in onnxruntime vs dlib's own `compute_face_descriptor`, interleaved.

    Both embed the same SynthFaces images: onnxruntime from the 112x112 crops (its warp to the chip included),
    dlib from the 150x150 chips that warp produced (uint8). Needs dlib-bin (dev extra), the reference only.
    """
    import os
    import tempfile
    import time

    if importlib.util.find_spec("dlib") is None:
        raise FacekdError("the benchmark compares against dlib itself: pip install dlib-bin (in the dev extra)")
    import dlib
    import onnxruntime as ort

    from evaluate.latency import system_info
    from facedata.synthfaces import render_image, settings_for
    from facekd.models import create_model, export_onnx

    torch.set_num_threads(threads)
    model = create_model("dlib_resnet")
    s = settings_for("tiny")
    crops = np.stack([render_image(s, "train", i % 16, i // 16) for i in range(images)])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().contiguous()
    with torch.no_grad():
        chips = model.to_chip(x).round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    chips = [np.ascontiguousarray(c) for c in chips]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, os.path.join(tmp, "dlib_resnet.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    recogniser = dlib.face_recognition_model_v1(str(dlib_model_path()))
    feed = {"input": x.numpy()}
    session.run(None, feed), recogniser.compute_face_descriptor(chips[:2])  # warm-up
    times: dict[str, list[float]] = {"onnxruntime": [], "dlib": []}
    for _ in range(rounds):
        for name, run in (("onnxruntime", lambda: session.run(None, feed)),
                          ("dlib", lambda: recogniser.compute_face_descriptor(chips))):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rate = {k: images / float(np.median(v)) for k, v in times.items()}
    return {"images_per_s": rate, "ratio": rate["onnxruntime"] / rate["dlib"], "images": images, "rounds": rounds,
            "threads": threads, "dlib": dlib.__version__, **system_info()}


@cli_main
def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m teachers.dlib_bench", description=bench.__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16, help="images per call (one batch each)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="threads for onnxruntime (and torch)")
    args = p.parse_args(argv)
    if min(args.images, args.rounds, args.threads) < 1:
        raise FacekdError("--images, --rounds and --threads must be at least 1")
    result = bench(args.images, args.rounds, args.threads)
    r = result["images_per_s"]
    print(json.dumps(result, indent=2))
    print(f"onnxruntime {r['onnxruntime']:.1f} images/s vs dlib {r['dlib']:.1f} images/s: "
          f"{result['ratio']:.1f}x ({result['cpu']}, {result['threads']} thread(s), batch {result['images']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
