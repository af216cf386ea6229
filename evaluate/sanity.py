"""Difficulty check of a verification benchmark (SynthFaces by default): a benchmark that is too easy cannot show
what a better teacher or distillation buys.

Prints, on the verification split of SPEC:
- raw-pixel cosine verification accuracy (should be near chance: the task is not solvable from pixels);
- accuracy of a quickly trained small CNN (CosFace head, from scratch; or `--model mobilefacenet` through the
  model registry) trained on the train split of SPEC (should be clearly above chance and far from 100%).

    python -m evaluate.sanity --spec synthfaces --steps 600 --batch 64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from facekd.io import FacekdError, cli_main


def _metrics(embeddings: np.ndarray, issame: np.ndarray, nfolds: int) -> dict:
    from evaluate.metrics import verification_metrics

    m = verification_metrics(embeddings, issame, nfolds=nfolds)
    return {"accuracy": round(m["accuracy"], 4), "std": round(m["std"], 4),
            "auc": None if m["auc"] is None else round(m["auc"], 4)}


def raw_pixel_metrics(images: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> dict[str, dict]:
    """Cosine of flattened pixels: as stored (x/255) and per-image centred (x - mean(x)).

    Pairs are scored in chunks (the full float copy of 12,000 images would need gigabytes); each pair's cosine c is
    then written as two 2-D unit vectors with dot product c, which the verification metrics score exactly."""
    out = {}
    for name in ("raw", "centred"):
        cos = np.empty(len(issame), np.float64)
        for a in range(0, len(issame), 256):
            x = images[2 * a:2 * (a + 256)].reshape(-1, 2, images[0].size).astype(np.float32) / 255.0
            if name == "centred":
                x -= x.mean(-1, keepdims=True)
            x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
            cos[a:a + len(x)] = (x[:, 0] * x[:, 1]).sum(-1)
        cos = np.clip(cos, -1.0, 1.0)
        emb = np.zeros((2 * len(cos), 2))
        emb[0::2, 0] = 1.0
        emb[1::2, 0], emb[1::2, 1] = cos, np.sqrt(1.0 - cos ** 2)
        out[name] = _metrics(emb, issame, nfolds)
    return out


def proxy_cnn(embedding_dim: int = 128):
    """~21 M MACs (a tenth of a MobileFaceNet): 2x downsample, five 3x3 conv stages, linear embedding.
    A stand-in that trains in minutes on a busy CPU; `--model mobilefacenet` runs the real student."""
    import torch.nn as nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))

    return nn.Sequential(nn.AvgPool2d(2), block(3, 24, 2), block(24, 32, 1), block(32, 64, 2), block(64, 64, 1),
                         block(64, 128, 2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(128 * 7 * 7, embedding_dim),
                         nn.BatchNorm1d(embedding_dim))


def train_and_eval(spec: str, *, model_name: str, steps: int, batch: int, lr: float, seed: int,
                   cache_dir: str | None, threads: int, eval_folds: int | None = None, flip: bool = True) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from facedata.datasets import open_train_set, open_verification_set
    from facedata.transforms import INSIGHTFACE_PREPROCESSING, normalize

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    train = open_train_set(spec, cache_dir=cache_dir)
    val = open_verification_set(spec, cache_dir=cache_dir)
    if model_name == "proxy":
        model, pre = proxy_cnn(), INSIGHTFACE_PREPROCESSING
    else:
        from facekd.models import create_model

        model = create_model(model_name)
        pre = model.preprocessing
    dim = 128 if model_name == "proxy" else model.embedding_dim
    weight = torch.nn.Parameter(torch.randn(train.num_classes, dim) * 0.01)
    opt = torch.optim.SGD([*model.parameters(), weight], lr=lr, momentum=0.9, weight_decay=5e-4)
    images = np.asarray(train.images) if hasattr(train, "images") else None
    if images is None:
        raise FacekdError("sanity training needs an in-memory dataset (SynthFaces)")
    labels = torch.from_numpy(train.labels)
    rng = np.random.default_rng(seed)
    s, m = 32.0, 0.3  # CosFace
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {model_name}", unit="step")
    for step in bar:
        for g in opt.param_groups:  # warmup then cosine
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = rng.integers(0, len(images), batch)
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2)
        flipped = torch.from_numpy(rng.random(batch) < 0.5)
        x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
        emb = model(normalize(x, pre))
        cos = F.normalize(emb) @ F.normalize(weight).t()
        y = labels[idx]
        logits = s * (cos - m * F.one_hot(y, train.num_classes))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    nfolds, pairs = val.nfolds, val.pairs
    if eval_folds and eval_folds < nfolds:  # the first folds only (folds are consecutive, identity-disjoint)
        pairs, nfolds = pairs // nfolds * eval_folds, eval_folds
    embs = []
    with torch.no_grad():
        for a in range(0, 2 * pairs, 256):
            x = torch.from_numpy(np.array(val.images[a:min(a + 256, 2 * pairs)])).permute(0, 3, 1, 2)
            e = model(normalize(x, pre))
            if flip:
                e = e + model(normalize(x.flip(-1), pre))
            embs.append(F.normalize(e).numpy())
    res = _metrics(np.concatenate(embs), val.issame[:pairs], nfolds)
    return {"model": model_name, "steps": steps, "batch": batch, "lr": lr, "train_seconds": round(train_s, 1),
            "threads": threads, "eval_pairs": pairs, "eval_folds": nfolds, "flip": flip, **res}


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluate.sanity", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default="synthfaces")
    p.add_argument("--model", default="proxy", help="'proxy' (built-in small CNN) or a registered model name")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-train", action="store_true", help="raw-pixel baseline only")
    p.add_argument("--eval-folds", type=int, default=None, help="score the first K folds only (faster)")
    p.add_argument("--no-flip", action="store_true", help="embed without the flipped copy (faster)")
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)
    from facedata.datasets import open_verification_set

    val = open_verification_set(args.spec, cache_dir=args.cache_dir)
    out = {"dataset": args.spec, "pairs": val.pairs, "raw_pixel": raw_pixel_metrics(val.images, val.issame, val.nfolds)}
    print(json.dumps(out), flush=True)
    if not args.no_train:
        out["trained"] = train_and_eval(args.spec, model_name=args.model, steps=args.steps, batch=args.batch,
                                        lr=args.lr, seed=args.seed, cache_dir=args.cache_dir, threads=args.threads,
                                        eval_folds=args.eval_folds, flip=not args.no_flip)
        print(json.dumps(out["trained"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
