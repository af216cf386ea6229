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
* pair_correct: per pair, whether the accuracy protocol's decision (its fold's chosen threshold) was right, as a
  string of '0'/'1' (compact in JSON), so two models evaluated on the same pairs can be compared pair by pair.

Statistics for comparing trained models (results.study): `mcnemar_exact` (exact two-sided binomial McNemar on
discordant pairs), `paired_discordance` (discordant counts of matched runs), `t_interval` / `t_test_p` (Student t
over seeds). The Student t distribution is computed here from its closed form for integer degrees of freedom
(Abramowitz & Stegun 26.7.3-4), so scipy is not a dependency.
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
    "far_achieved": {...}, "auc", "eer", "pairs", "roc": {"fpr": [...], "tpr": [...]}, "pair_correct": "0110..."}`;
    see the module docstring.
    """
    dist, same = pair_distances(embeddings, issame)
    accuracies, chosen = [], []
    correct = np.zeros(len(dist), dtype=bool)
    for test, train, test_counts in _folds(dist, same, nfolds, ACCURACY_THRESHOLDS):
        best = int(np.argmax(_accuracy(train)))
        chosen.append(ACCURACY_THRESHOLDS[best])
        accuracies.append(float(_accuracy(test_counts, best)))
        correct[test] = (dist[test] < ACCURACY_THRESHOLDS[best]) == same[test]
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
        "pair_correct": (correct.astype(np.uint8) + ord("0")).tobytes().decode("ascii"),
    }


def decode_pair_correct(text: str) -> np.ndarray:
    """The bool array of a `pair_correct` string."""
    arr = np.frombuffer(str(text).encode("ascii"), dtype=np.uint8)
    if not np.isin(arr, (48, 49)).all():
        raise FacekdError("pair_correct must be a string of '0' and '1'")
    return arr == 49


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b, c = discordant pairs (A right & B wrong, A wrong & B right).

    Under H0 each discordant pair falls either way with probability 1/2, so min(b, c) ~ Binomial(b + c, 1/2):
    p = min(1, 2 P(X <= min(b, c))), computed with exact integers.
    """
    if b < 0 or c < 0:
        raise FacekdError(f"discordant counts must be >= 0, got {b}, {c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_discordance(correct_a: Sequence[Any], correct_b: Sequence[Any]) -> tuple[int, int]:
    """Discordant counts (b, c) summed over matched runs: run i of A against run i of B on the same pairs.

    Each element is a `pair_correct` string or a bool array; matched runs must have the same number of pairs.
    """
    if len(correct_a) != len(correct_b):
        raise FacekdError(f"{len(correct_a)} runs of A but {len(correct_b)} of B to match")
    b = c = 0
    for x, y in zip(correct_a, correct_b):
        x = decode_pair_correct(x) if isinstance(x, str) else np.asarray(x, dtype=bool)
        y = decode_pair_correct(y) if isinstance(y, str) else np.asarray(y, dtype=bool)
        if x.shape != y.shape:
            raise FacekdError(f"runs are not on the same pairs ({x.size} vs {y.size})")
        b += int(np.sum(x & ~y))
        c += int(np.sum(~x & y))
    return b, c


def t_cdf_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with integer `df` degrees of freedom (Abramowitz & Stegun 26.7.3 / 26.7.4)."""
    if df < 1 or int(df) != df:
        raise FacekdError(f"degrees of freedom must be a positive integer, got {df}")
    t = abs(float(t))
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df/2 terms
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = 1.0  # (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), (df-1)/2 terms
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| <= t) = confidence (e.g. 0.95 -> the two-sided 97.5th percentile), by bisection."""
    if not 0.0 < confidence < 1.0:
        raise FacekdError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while t_cdf_central(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_central(mid, df) < confidence else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student t interval of the mean, mean +- t_{n-1} * s / sqrt(n), s with ddof=1 (n >= 2)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        raise FacekdError(f"a t interval needs at least 2 values, got {x.size}")
    mean = float(x.mean())
    half = t_quantile(confidence, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def t_test_p(differences: Sequence[float]) -> float:
    """Two-sided one-sample t-test p-value of H0 mean = 0 (e.g. paired per-seed accuracy differences; n >= 2)."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        raise FacekdError(f"a t-test needs at least 2 values, got {d.size}")
    sd = float(d.std(ddof=1))
    if sd == 0:
        return 1.0 if float(d.mean()) == 0 else 0.0
    return 1.0 - t_cdf_central(float(d.mean()) / (sd / math.sqrt(d.size)), d.size - 1)


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
