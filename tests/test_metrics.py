"""evaluate.metrics against deliberately slow, obviously-correct pure-Python references of the insightface protocol."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluate.metrics import far_key, kfold_slices, plot_roc, verification_metrics
from facekd.io import FacekdError


def make_pairs(pairs: int, dim: int = 16, noise: float = 1.0, seed: int = 0, genuine_every: int = 2):
    """L2-normalised embeddings where genuine pairs are noisy copies: distances spread over (0, 4)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((2 * pairs, dim))
    same = rng.random(pairs) < 1.0 / genuine_every
    emb[1::2][same] = emb[0::2][same] + noise * rng.standard_normal((int(same.sum()), dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, same


# ---------------------------------------------------------------- reference (plain Python, one count at a time)

def ref_distances(emb) -> list[float]:
    rows = emb.tolist()
    return [sum((a - b) ** 2 for a, b in zip(rows[2 * i], rows[2 * i + 1])) for i in range(len(rows) // 2)]


def ref_folds(n: int, k: int) -> list[tuple[list[int], list[int]]]:
    """sklearn KFold(k, shuffle=False): contiguous, the first n % k folds one larger."""
    folds, start = [], 0
    for f in range(k):
        size = n // k + (1 if f < n % k else 0)
        test = list(range(start, start + size))
        folds.append(([i for i in range(n) if i < start or i >= start + size], test))
        start += size
    return folds


def ref_accuracy(dist, same, idx, threshold) -> float:
    correct = 0
    for i in idx:
        if (dist[i] < threshold) == same[i]:
            correct += 1
    return correct / len(idx)


def ref_verification_accuracy(emb, same, nfolds=10):
    dist, same = ref_distances(emb), [bool(s) for s in same]
    thresholds = [float(t) for t in np.arange(0, 4, 0.01)]  # the grid itself must be insightface's
    accs, chosen = [], []
    for train, test in ref_folds(len(dist), nfolds):
        best_t, best_acc = None, -1.0
        for t in thresholds:
            acc = ref_accuracy(dist, same, train, t)
            if acc > best_acc:  # strict: the first maximum wins, like np.argmax
                best_t, best_acc = t, acc
        chosen.append(best_t)
        accs.append(ref_accuracy(dist, same, test, best_t))
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return mean, std, sum(chosen) / len(chosen)


def ref_tar_at_far(emb, same, target, nfolds=10):
    """calculate_val as a loop; the interpolation is older scipy's interp1d(kind='slinear') written out by hand."""
    dist, same = ref_distances(emb), [bool(s) for s in same]
    thresholds = [float(t) for t in np.arange(0, 4, 0.001)]
    tars = []
    for train, test in ref_folds(len(dist), nfolds):
        n_diff = sum(1 for i in train if not same[i])
        far_train = [sum(1 for i in train if not same[i] and dist[i] < t) / n_diff for t in thresholds]
        if max(far_train) >= target:
            # degree-1 spline through (far, threshold) in order: segment [j, j+1] with far[j] <= target < far[j+1]
            j = max(i for i, f in enumerate(far_train) if f <= target)
            if far_train[j] == target or j == len(far_train) - 1:
                threshold = thresholds[j]
            else:
                w = (target - far_train[j]) / (far_train[j + 1] - far_train[j])
                threshold = thresholds[j] + w * (thresholds[j + 1] - thresholds[j])
        else:
            threshold = 0.0
        accepted = sum(1 for i in test if same[i] and dist[i] < threshold)
        tars.append(accepted / sum(1 for i in test if same[i]))
    return sum(tars) / len(tars)


def ref_auc(emb, same) -> float:
    """Mann-Whitney: P(genuine distance < impostor distance) + half the ties."""
    dist = ref_distances(emb)
    gen = [d for d, s in zip(dist, same) if s]
    imp = [d for d, s in zip(dist, same) if not s]
    wins = sum(1.0 if g < i else 0.5 if g == i else 0.0 for g in gen for i in imp)
    return wins / (len(gen) * len(imp))


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("pairs,noise,nfolds", [(303, 1.0, 10), (240, 0.6, 10), (57, 1.2, 5)])
def test_accuracy_matches_bruteforce(pairs, noise, nfolds):
    emb, same = make_pairs(pairs, noise=noise, seed=pairs)
    got = verification_metrics(emb, same, nfolds=nfolds)
    acc, std, thr = ref_verification_accuracy(emb, same, nfolds)
    assert 0.6 < got["accuracy"] < 1.0  # non-trivial: the threshold search matters
    assert got["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert got["std"] == pytest.approx(std, abs=1e-12)
    assert got["best_threshold"] == pytest.approx(thr, abs=1e-12)
    assert got["pairs"] == pairs


def test_tar_at_far_matches_bruteforce():
    emb, same = make_pairs(150, noise=1.3, seed=7)
    targets = (0.02, 0.05, 0.1)  # 150 pairs: ~68 impostors per training split, so these targets are measurable
    got = verification_metrics(emb, same, far_targets=targets)["tar_at_far"]
    values = []
    for target in targets:
        want = ref_tar_at_far(emb, same, target)
        assert got[far_key(target)] == pytest.approx(want, abs=1e-12)
        values.append(want)
    assert 0.0 < values[0] < values[-1] < 1.0  # a real trade-off, not a degenerate 0 / 1


def _pairs_at(distances: list[float]) -> np.ndarray:
    """Unit 2-d embeddings whose pairs lie at exactly these squared L2 distances (|a - b|^2 = 2 - 2 cos theta)."""
    rows = []
    for d in distances:
        theta = math.acos(1.0 - d / 2.0)
        rows += [[1.0, 0.0], [math.cos(theta), math.sin(theta)]]
    return np.array(rows)


@pytest.mark.parametrize("nfolds", [1, 2])
def test_tar_at_far_by_hand(nfolds):
    # 10 impostors at 0.1005, 0.2005, ..., 1.0005 (between grid points of the 0.001 threshold grid): the training
    # FAR on the grid is k/10 for thresholds in (0.1k + 0.0005, 0.1(k+1) + 0.0005].
    # - FAR 0.1: the last grid threshold with FAR <= 0.1 is 0.200, where FAR is exactly 0.1 -> threshold 0.200;
    #   genuine pairs closer than 0.200: 0.05, 0.15 -> TAR 2/5; impostors accepted: 0.1005 -> FAR 1/10
    # - FAR 0.12: FAR is 0.1 at 0.200 and 0.2 at 0.201 -> interpolated threshold 0.200 + 0.2 * 0.001 = 0.2002;
    #   genuine 0.2001 now passes -> TAR 3/5; impostors accepted: 0.1005 only -> FAR 1/10
    # - FAR 0.3: threshold 0.400 -> genuine 0.05, 0.15, 0.2001, 0.25 -> TAR 4/5; impostors 0.1005..0.3005 -> 3/10
    # With 2 folds the set is repeated, so each training fold is the other, identical, half: the same answers.
    impostors = [0.1 * k + 0.0005 for k in range(1, 11)]
    genuine = [0.05, 0.15, 0.2001, 0.25, 0.6]
    dist = genuine + impostors
    same = np.array([True] * 5 + [False] * 10)
    emb, same = np.tile(_pairs_at(dist), (nfolds, 1)), np.tile(same, nfolds)
    got = verification_metrics(emb, same, nfolds=nfolds, far_targets=(0.1, 0.12, 0.3))
    assert got["tar_at_far"] == {"1e-1": pytest.approx(0.4), "1.2e-1": pytest.approx(0.6), "3e-1": pytest.approx(0.8)}
    assert got["far_achieved"] == {"1e-1": pytest.approx(0.1), "1.2e-1": pytest.approx(0.1), "3e-1": pytest.approx(0.3)}


def test_auc_eer_against_reference():
    emb, same = make_pairs(200, noise=1.2, seed=3)
    got = verification_metrics(emb, same)
    assert got["auc"] == pytest.approx(ref_auc(emb, same), abs=1e-12)
    # at the EER the two error rates are equal: bracket it by the exact ROC around the crossing
    dist = np.array(ref_distances(emb))
    gen, imp = dist[same], dist[~same]
    rates = [((imp <= t).mean(), (gen > t).mean()) for t in np.sort(dist)]
    below = max(far for far, frr in rates if frr >= far)
    above = min(far for far, frr in rates if frr <= far)
    assert below <= got["eer"] <= above and 0.0 < got["eer"] < 0.5


def test_ties_count_half_and_separable_is_perfect():
    # four pairs: two genuine at distance 0, two impostors at distance 0 and 4 -> AUC = (2 * 0.5 + 2 * 1) / 4
    e = np.array([[1.0, 0.0]] * 6 + [[1.0, 0.0], [-1.0, 0.0]])
    same = np.array([True, True, False, False])
    got = verification_metrics(e, same, nfolds=1, far_targets=())
    assert got["auc"] == pytest.approx(0.75)
    assert got["eer"] == pytest.approx(1 / 3)  # ROC (0,0) -> (0.5,1): FAR = FRR where 0.5a = 1 - a
    sep, same = make_pairs(100, noise=0.05, seed=1)
    got = verification_metrics(sep, same)
    assert got["accuracy"] == 1.0 and got["auc"] == 1.0 and got["eer"] == 0.0 and got["std"] == 0.0


def test_far_targets_reported_only_when_measurable():
    emb, same = make_pairs(6000, dim=8, noise=0.8, seed=5)
    got = verification_metrics(emb, same)["tar_at_far"]
    assert set(got) == {"1e-3", "1e-4"}
    assert isinstance(got["1e-3"], float) and got["1e-4"] is None  # ~2,700 impostors per training split
    # 23,000 pairs, ~10,350 impostors per training split >= 10,000: 1e-4 becomes measurable
    emb, same = make_pairs(23000, dim=8, noise=0.8, seed=6)
    got = verification_metrics(emb, same)["tar_at_far"]
    assert isinstance(got["1e-4"], float) and 0.0 <= got["1e-4"] <= got["1e-3"] <= 1.0


def test_folds_match_sklearn_kfold():
    sizes = [s.stop - s.start for s in kfold_slices(303, 10)]
    assert sizes == [31, 31, 31] + [30] * 7
    assert kfold_slices(5, 1) == [slice(0, 5)]


def test_roc_is_small_monotone_and_json_ready(tmp_path):
    emb, same = make_pairs(3000, dim=8, noise=1.0, seed=2)
    got = verification_metrics(emb, same)
    fpr, tpr = got["roc"]["fpr"], got["roc"]["tpr"]
    assert 50 < len(fpr) == len(tpr) <= 200
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert json.loads(json.dumps(got)) == got
    png = plot_roc({"a": (fpr, tpr), "b": (fpr, tpr)}, tmp_path / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_inputs_give_clear_errors():
    emb, same = make_pairs(20)
    with pytest.raises(FacekdError, match="odd number of images"):
        verification_metrics(emb[:-1], same)
    with pytest.raises(FacekdError, match="issame has 19 labels for 20 pairs"):
        verification_metrics(emb, same[:-1])
    bad = emb.copy()
    bad[5, 3] = np.nan
    with pytest.raises(FacekdError, match="NaN or inf.*row 5"):
        verification_metrics(bad, same)
    with pytest.raises(FacekdError, match="L2-normalised"):
        verification_metrics(emb * 3.0, same)
    with pytest.raises(FacekdError, match="cannot be split into 10 folds"):
        verification_metrics(emb[:8], same[:4])


# ---------------------------------------------------------------- per-pair decisions and the study's statistics

def test_pair_correct_is_each_pairs_decision_at_its_folds_threshold():
    from evaluate.metrics import decode_pair_correct

    emb, same = make_pairs(240, noise=0.8, seed=3)
    got = verification_metrics(emb, same, nfolds=10)
    dist, flags = ref_distances(emb), [bool(s) for s in same]
    thresholds = [float(t) for t in np.arange(0, 4, 0.01)]
    expected = []
    for train, test in ref_folds(len(dist), 10):
        best_t, best_acc = None, -1.0
        for t in thresholds:
            acc = ref_accuracy(dist, flags, train, t)
            if acc > best_acc:
                best_t, best_acc = t, acc
        expected += ["1" if (dist[i] < best_t) == flags[i] else "0" for i in test]
    assert got["pair_correct"] == "".join(expected)
    assert decode_pair_correct(got["pair_correct"]).mean() == pytest.approx(got["accuracy"])  # equal folds
    json.dumps(got)  # JSON-ready


def _two_sided_by_enumeration(b: int, c: int) -> float:
    """McNemar's exact p by listing all 2^n ways n discordant pairs can fall: P(outcome as extreme as observed)."""
    n, k = b + c, min(b, c)
    extreme = sum(1 for bits in range(2 ** n) if min(bin(bits).count("1"), n - bin(bits).count("1")) <= k)
    return extreme / 2 ** n


@pytest.mark.parametrize("b,c", [(1, 6), (0, 5), (4, 4), (3, 9), (10, 2), (0, 0)])
def test_mcnemar_exact_matches_enumeration(b, c):
    from evaluate.metrics import mcnemar_exact

    assert mcnemar_exact(b, c) == pytest.approx(_two_sided_by_enumeration(b, c) if b + c else 1.0, abs=1e-15)


def test_mcnemar_exact_against_scipy_when_present():
    stats = pytest.importorskip("scipy.stats", reason="scipy is not a facekd dependency; enumeration test covers it")
    from evaluate.metrics import mcnemar_exact

    for b, c in ((40, 61), (300, 350), (7, 0), (1000, 1100)):
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_paired_discordance_sums_matched_runs():
    from evaluate.metrics import paired_discordance

    assert paired_discordance(["1100", "1010"], ["1010", "1111"]) == (1 + 0, 1 + 2)
    with pytest.raises(FacekdError, match="same pairs"):
        paired_discordance(["110"], ["1100"])
    with pytest.raises(FacekdError, match="to match"):
        paired_discordance(["1"], [])


def test_student_t_against_table_values_and_closed_forms():
    from evaluate.metrics import t_interval, t_quantile, t_test_p

    # two-sided 95% critical values from statistical tables (t_{0.975, df})
    for df, value in ((1, 12.7062047362), (2, 4.30265272975), (3, 3.18244630528), (4, 2.77644510520),
                      (9, 2.26215716280), (29, 2.04522964213)):
        assert t_quantile(0.95, df) == pytest.approx(value, abs=1e-9)
    mean, low, high = t_interval([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82)
    assert high - mean == pytest.approx(4.30265272975 * 0.02 / math.sqrt(3), abs=1e-11)
    assert mean - low == pytest.approx(high - mean)
    # df = 2 has the closed form P(|T| > t) = 1 - t / sqrt(2 + t^2); differences 1, 2, 3: t = 2 / (1 / sqrt 3)
    t = 2 * math.sqrt(3)
    assert t_test_p([1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    # df = 1 is Cauchy: P(|T| > t) = 1 - 2 atan(t) / pi; differences 1, 3: mean 2, s = sqrt 2, t = 2
    assert t_test_p([1.0, 3.0]) == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, abs=1e-12)
    with pytest.raises(FacekdError, match="at least 2"):
        t_interval([0.5])
