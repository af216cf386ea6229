"""The face-verification protocol of LFW / insightface, vectorised.

Follows insightface `recognition/arcface_torch/eval/verification.py` (itself from facenet's `lfw.py`):
pairs are consecutive rows of the L2-normalised embeddings, the score is the squared L2 distance, a pair is
predicted "same" when `dist < threshold` (strict), and the pairs are cut into `nfolds` contiguous folds without
shuffling (sklearn `KFold(n_splits, shuffle=False)`: the first `P % nfolds` folds get one extra pair).

* accuracy: per fold, the threshold of `arange(0, 4, 0.01)` with the best accuracy on the other folds (first one on
  ties, `np.argmax`) is applied to the held-out fold; we report the mean and the population std of the fold
  accuracies, and `best_threshold` = the mean of the chosen thresholds.
* TAR@FAR: per fold, thresholds `arange(0, 4, 0.001)`; the threshold where the training FAR reaches the target is
  interpolated on the (FAR, threshold) sequence, else 0; TAR is measured on the held-out fold; we report the mean.
  insightface calls `scipy.interpolate.interp1d(far_train, thresholds, kind='slinear')`, which current scipy rejects
  because the FAR sequence repeats values (insightface issue #2152). We implement what it computed on older scipy,
  a degree-1 spline through the points in threshold order: linear between the last threshold whose FAR is <= target
  and the next one, and exactly the last such threshold when its FAR equals the target.
  A target is reported only when it is measurable: every training split must hold at least `ceil(1 / target)`
  impostor pairs (so a single false accept on the training split is a FAR of at most the target) and every held-out
  fold at least one genuine pair; otherwise the value is None. LFW (3,000 impostor pairs, 2,700 per training split)
  gets 1e-3 but not 1e-4; 1e-4 needs >= 11,112 impostor pairs with 10 folds.
* AUC and EER over all pairs at once (no folds), from the exact ROC (accept when `dist <= t` over every distinct t).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facekd.io import FacekdError, cli_main

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
ROC_POINTS = 200


def far_key(far: float) -> str:
    """'1e-3' for 0.001, '1.5e-1' for 0.15 (no two targets share a key): the key under which TAR@FAR is stored."""
    mantissa, exponent = f"{far:.12e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def pair_distances(embeddings: np.ndarray, issame: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate (2P, D) embeddings and P labels; return squared L2 distances (float64, P) and labels (bool, P)."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise FacekdError(f"embeddings must be a non-empty (2P, D) array, got shape {emb.shape}")
    if emb.shape[0] % 2:
        raise FacekdError(f"embeddings hold an odd number of images ({emb.shape[0]}); verification needs "
                          "consecutive pairs (image 2i vs 2i+1)")
    if not np.issubdtype(emb.dtype, np.number):
        raise FacekdError(f"embeddings must be numeric, got dtype {emb.dtype}")
    emb = emb.astype(np.float64, copy=False)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise FacekdError(f"{int(bad.sum())} of {len(emb)} embeddings contain NaN or inf (first: row "
                          f"{int(np.argmax(bad))}); the model output is broken")
    norms = np.linalg.norm(emb, axis=1)
    off = ~((np.abs(norms - 1.0) < 1e-2) | (norms == 0))  # loose enough for fp16-stored embeddings
    if off.any():
        raise FacekdError(f"embeddings must be L2-normalised (row {int(np.argmax(off))} has norm "
                          f"{norms[np.argmax(off)]:.4g}); use evaluate.embed.embed_images")
    labels = np.asarray(issame)
    if labels.ndim != 1 or len(labels) != emb.shape[0] // 2:
        raise FacekdError(f"issame has {labels.size} labels for {emb.shape[0] // 2} pairs "
                          f"({emb.shape[0]} images); they must match")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise FacekdError("issame must hold booleans (or 0/1)")
        labels = labels.astype(bool)
    diff = emb[0::2] - emb[1::2]
    return np.sum(np.square(diff), 1), labels


def kfold_slices(n: int, nfolds: int) -> list[slice]:
    """Contiguous test folds exactly like sklearn `KFold(nfolds, shuffle=False)`; nfolds=1 tests on all pairs."""
    if nfolds < 1:
        raise FacekdError(f"nfolds must be >= 1, got {nfolds}")
    if nfolds == 1:
        return [slice(0, n)]
    if n < nfolds:
        raise FacekdError(f"{n} pairs cannot be split into {nfolds} folds")
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    stops = np.cumsum(sizes)
    return [slice(int(stop - size), int(stop)) for stop, size in zip(stops, sizes)]


def _counts_below(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each threshold, how many genuine / impostor pairs have `dist < threshold` (exact integer counts)."""
    genuine = np.sort(dist[same])
    impostor = np.sort(dist[~same])
    return (np.searchsorted(genuine, thresholds, side="left"),
            np.searchsorted(impostor, thresholds, side="left"))


def _folds(dist: np.ndarray, same: np.ndarray, nfolds: int, thresholds: np.ndarray):
    """Yield per fold: (test slice, train counts, test counts); counts = (pairs, genuine, accepted genuine per
    threshold, accepted impostors per threshold)."""
    all_tp, all_fp = _counts_below(dist, same, thresholds)
    n_all, g_all = len(dist), int(same.sum())
    single = nfolds == 1  # insightface's LFold(1): train on all pairs, test on all pairs
    for test in kfold_slices(len(dist), nfolds):
        tp, fp = _counts_below(dist[test], same[test], thresholds)
        n, g = test.stop - test.start, int(same[test].sum())
        test_counts = (n, g, tp, fp)
        train_counts = test_counts if single else (n_all - n, g_all - g, all_tp - tp, all_fp - fp)
        yield test, train_counts, test_counts


def _accuracy(counts, index=slice(None)) -> np.ndarray:
    n, g, tp, fp = counts
    tn = (n - g) - fp[index]
    return (tp[index] + tn) / n


def _threshold_at_far(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Threshold where the (non-decreasing) FAR curve reaches `target`; older scipy interp1d 'slinear' semantics."""
    if far.max() < target:
        return 0.0
    i = int(np.searchsorted(far, target, side="right")) - 1  # last index with far <= target (far[0] == 0 <= target)
    if far[i] == target or i == len(far) - 1:
        return float(thresholds[i])
    w = (target - far[i]) / (far[i + 1] - far[i])
    return float(thresholds[i] + w * (thresholds[i + 1] - thresholds[i]))


def _tar_at_far(dist: np.ndarray, same: np.ndarray, nfolds: int, target: float) -> tuple[float | None, float | None]:
    """(mean TAR, mean achieved FAR) over held-out folds, or (None, None) when the pairs cannot measure `target`."""
    need = math.ceil(1.0 / target - 1e-9)
    tars, fars = [], []
    for test, (n_tr, g_tr, _, fp_tr), (n_te, g_te, _, _) in _folds(dist, same, nfolds, VAL_THRESHOLDS):
        if n_tr - g_tr < need or g_te == 0:
            return None, None
        threshold = _threshold_at_far(fp_tr / float(n_tr - g_tr), VAL_THRESHOLDS, target)
        # an interpolated threshold is off the grid: count the held-out fold directly
        accept, t_same = dist[test] < threshold, same[test]
        tars.append(float(np.sum(accept & t_same)) / float(g_te))
        fars.append(float(np.sum(accept & ~t_same)) / float(n_te - g_te) if n_te > g_te else 0.0)
    return float(np.mean(tars)), float(np.mean(fars))


def roc_curve(dist: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC over all pairs: (fpr, tpr) accepting `dist <= t` at every distinct distance, starting at (0, 0)."""
    order = np.argsort(dist, kind="stable")
    d, s = dist[order], same[order]
    last_of_tie = np.r_[d[1:] != d[:-1], True]
    tp = np.cumsum(s)[last_of_tie]
    fp = np.cumsum(~s)[last_of_tie]
    n_gen, n_imp = int(s.sum()), int((~s).sum())
    return np.r_[0.0, fp / n_imp], np.r_[0.0, tp / n_gen]


def auc_eer(fpr: np.ndarray, tpr: np.ndarray) -> tuple[float, float]:
    """Area under the ROC (ties count half) and the equal error rate (FAR = FRR, linear between ROC points)."""
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    gap = (1.0 - tpr) - fpr  # FRR - FAR: 1 at (0,0), -1 at (1,1), non-increasing
    k = int(np.argmax(gap <= 0))
    alpha = gap[k - 1] / (gap[k - 1] - gap[k])
    eer = float(fpr[k - 1] + alpha * (fpr[k] - fpr[k - 1]))
    return auc, eer


def downsample_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = ROC_POINTS) -> tuple[list[float], list[float]]:
    """At most `points` ROC points for JSON: half evenly along the curve, half log-spaced in FAR (for log plots)."""
    n = len(fpr)
    if n <= points:
        return fpr.tolist(), tpr.tolist()
    even = np.linspace(0, n - 1, points // 2).round().astype(int)
    positive = fpr[fpr > 0]
    logspaced = np.searchsorted(fpr, np.geomspace(positive.min(), 1.0, points - len(even)), side="right") - 1
    keep = np.unique(np.r_[even, logspaced, 0, n - 1])
    if len(keep) > points:  # the union can exceed the budget by the two end points; thin it, ends included
        keep = np.unique(keep[np.linspace(0, len(keep) - 1, points).round().astype(int)])
    return fpr[keep].tolist(), tpr[keep].tolist()


def verification_metrics(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray, nfolds: int = 10,
                         far_targets: Sequence[float] = (1e-3, 1e-4)) -> dict[str, Any]:
    """insightface/LFW verification metrics of (2P, D) L2-normalised embeddings (pair i = rows 2i, 2i+1).

    Returns `{"accuracy", "std", "best_threshold", "tar_at_far": {"1e-3": float | None, ...},
    "far_achieved": {...}, "auc", "eer", "pairs", "roc": {"fpr": [...], "tpr": [...]}}`; see the module docstring.
    """
    dist, same = pair_distances(embeddings, issame)
    accuracies, chosen = [], []
    for _, train, test in _folds(dist, same, nfolds, ACCURACY_THRESHOLDS):
        best = int(np.argmax(_accuracy(train)))
        chosen.append(ACCURACY_THRESHOLDS[best])
        accuracies.append(float(_accuracy(test, best)))
    tar, far = {}, {}
    for target in far_targets:
        tar[far_key(target)], far[far_key(target)] = _tar_at_far(dist, same, nfolds, target)
    if same.all() or not same.any():
        auc = eer = None
        roc = {"fpr": [], "tpr": []}
    else:
        fpr, tpr = roc_curve(dist, same)
        auc, eer = auc_eer(fpr, tpr)
        roc_fpr, roc_tpr = downsample_roc(fpr, tpr)
        roc = {"fpr": roc_fpr, "tpr": roc_tpr}
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "best_threshold": float(np.mean(chosen)),
        "tar_at_far": tar,
        "far_achieved": far,
        "auc": auc,
        "eer": eer,
        "pairs": int(len(dist)),
        "roc": roc,
    }


def plot_roc(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
             title: str = "ROC (verification pairs)") -> Path:
    """One PNG with a ROC curve per name (FAR on a log axis, TAR linear); headless (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facekd.io import atomic_path

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    floor = 1.0
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        keep = fpr > 0  # a log axis cannot show FAR 0
        if keep.any():
            floor = min(floor, float(fpr[keep].min()))
        ax.plot(fpr[keep], tpr[keep], label=name, linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlim(max(floor, 1e-6), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _loop_metrics(dist: np.ndarray, same: np.ndarray, nfolds: int = 10) -> float:
    """insightface's own structure (a numpy pass per threshold per fold), for the side-by-side benchmark."""
    accuracies = []
    for test in kfold_slices(len(dist), nfolds):
        train = np.ones(len(dist), bool)
        train[test] = False
        acc = [np.mean((dist[train] < t) == same[train]) for t in ACCURACY_THRESHOLDS]
        best = ACCURACY_THRESHOLDS[int(np.argmax(acc))]
        accuracies.append(np.mean((dist[test] < best) == same[test]))
        far = [np.sum((dist[train] < t) & ~same[train]) / np.sum(~same[train]) for t in VAL_THRESHOLDS]
        _threshold_at_far(np.asarray(far), VAL_THRESHOLDS, 1e-3)
    return float(np.mean(accuracies))


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluate.metrics",
        description="Benchmark verification_metrics on random pairs against insightface's per-threshold loop.")
    parser.add_argument("--pairs", type=int, default=6000, help="number of pairs (default 6000, LFW/SynthFaces size)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.pairs < 10 or args.dim < 1 or args.repeats < 1:
        raise FacekdError("--pairs must be >= 10, --dim and --repeats >= 1")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2 * args.pairs, args.dim))
    same = np.arange(args.pairs) % 2 == 0
    emb[1::2][same] = emb[0::2][same] + 0.9 * rng.standard_normal((int(same.sum()), args.dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    best = min(_timed(lambda: verification_metrics(emb, same)) for _ in range(args.repeats))
    loop = _timed(lambda: _loop_metrics(*pair_distances(emb, same)))
    print(f"verification_metrics: {args.pairs} pairs x {args.dim}-d, 10 folds, 400 + 4000 thresholds, "
          f"2 FAR targets + AUC/EER/ROC")
    print(f"  vectorised (best of {args.repeats}): {best * 1e3:.1f} ms")
    print(f"  insightface-style numpy pass per threshold (accuracy + TAR@1e-3 only, 1 run): {loop * 1e3:.0f} ms")
    print(f"  ratio loop / vectorised: {loop / best:.0f}x")
    return 0


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())
