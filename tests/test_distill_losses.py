"""Distillation losses against values computed by hand (numpy) on tiny batches, and the combined objective."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.losses import AdaDistillHead, FeatureKD, LogitKD, RelationalKD
from distill.objective import DistillObjective, parse_kd
from facekd.io import FacekdError


def _unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_feature_kd_cosine_by_hand():
    s, t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # cos = 1/sqrt(2) and -1  ->  mean(1 - cos)
    expected = ((1 - 1 / math.sqrt(2)) + 2.0) / 2
    assert FeatureKD("cosine")(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_feature_kd_mse_by_hand():
    s, t = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), np.array([[1.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    expected = ((_unit(s) - _unit(t)) ** 2).mean()  # 2 x 3 entries
    assert expected == pytest.approx(2 * 1.1464466 / 3, rel=1e-6)  # = mean(2 - 2 cos) / d
    got = FeatureKD("mse")(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_feature_kd_rejects_unknown_metric():
    with pytest.raises(ValueError, match="cosine"):
        FeatureKD("l1")


@pytest.mark.parametrize("temperature,scale", [(1.0, 1.0), (2.0, 3.0)])
def test_logit_kd_by_hand(temperature, scale):
    centres = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    s, t = np.array([[2.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_s = softmax(scale * _unit(s) @ centres.T / temperature)
    p_t = softmax(scale * _unit(t) @ centres.T / temperature)
    expected = temperature ** 2 * (p_t * np.log(p_t / p_s)).sum(axis=1).mean()
    loss = LogitKD(torch.tensor(centres), temperature=temperature, scale=scale)
    got = loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # identical student and teacher: no divergence
    assert loss(torch.tensor(t, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)).item() == pytest.approx(0, abs=1e-6)


def test_logit_kd_one_sample_closed_form():
    # z_s = [1, 0], z_t = [0, 1]: KL = (sigma(1) - sigma(-1)) * 1
    loss = LogitKD(torch.eye(2), temperature=1.0, scale=1.0)(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    sig = 1 / (1 + math.exp(-1))
    assert loss.item() == pytest.approx(sig - (1 - sig), rel=1e-6)


def test_relational_kd_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # off-diagonal cos: student (0, .7071, .7071), teacher (1, 0, 0) -> squared diffs 1, .5, .5 (each twice)
    assert RelationalKD()(s, t).item() == pytest.approx(2 / 3, rel=1e-6)
    # invariant to per-row scale (it compares cosine similarities) and to a teacher of another width
    t_wide = torch.cat([t, torch.zeros(3, 5)], dim=1)
    assert RelationalKD()(3 * s, t_wide).item() == pytest.approx(2 / 3, rel=1e-6)


def test_adadistill_centre_update_and_loss_by_hand():
    head = AdaDistillHead(2, 2, margin="arcface", s=1.0, m=0.45)
    with torch.no_grad():
        head.centres.copy_(torch.eye(2))
    student, teacher, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]]), torch.tensor([0])
    loss = head(student, teacher, labels)
    # alpha = cos(s, t) * cos(W_0, t) = 0.6 * 0.6; W_0 <- alpha W_0 + (1 - alpha) t
    alpha = 0.36
    w0 = alpha * np.array([1.0, 0.0]) + (1 - alpha) * np.array([0.6, 0.8])
    np.testing.assert_allclose(head.centres[0].numpy(), w0, rtol=1e-6)
    np.testing.assert_allclose(head.centres[1].numpy(), [0.0, 1.0])  # untouched class
    assert head.last_stats["alpha"].item() == pytest.approx(alpha, rel=1e-6)
    cos_target = w0[0] / np.linalg.norm(w0)
    target_logit = math.cos(math.acos(cos_target) + 0.45)  # ArcFace, s = 1
    expected = -target_logit + math.log(math.exp(target_logit) + math.exp(0.0))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_adadistill_duplicate_labels_average_and_no_grad_to_centres():
    head = AdaDistillHead(2, 3, s=1.0)
    with torch.no_grad():
        head.centres.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    head(student, teacher, torch.tensor([2, 2])).backward()
    # per-sample alpha: 1 * cos(W2, t) = 0.7071 and 0 * ... clamped to 1e-6
    a1, a2 = 1 / math.sqrt(2), 1e-6
    w2 = ((a1 * np.array([1, 1]) + (1 - a1) * np.array([1, 0])) + (a2 * np.array([1, 1]) + (1 - a2) * np.array([0, 1]))) / 2
    np.testing.assert_allclose(head.centres[2].numpy(), w2, rtol=1e-5)
    assert head.centres.grad is None and not head.centres.requires_grad
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_parse_kd():
    assert parse_kd("feature+logit") == ("feature", "logit")
    assert parse_kd("none") == ()
    assert parse_kd("adadistill,relational") == ("adadistill", "relational")
    with pytest.raises(FacekdError, match="unknown value 'hint'.*feature, logit, relational, adadistill"):
        parse_kd("feature+hint")
    with pytest.raises(FacekdError, match="cannot be combined"):
        parse_kd("none+feature")


class _FakeCache:
    embedding_dim = 4

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(10, 2, 4, generator=g)
        self.calls = 0

    def lookup(self, indices, flipped):
        self.calls += 1
        return self.table[indices, flipped.long()]


def test_objective_combines_components_with_weights_and_projection():
    from distill.objective import CachedTeacher
    from distill.losses import FeatureKD as F_, LogitKD as L_

    torch.manual_seed(0)
    cache = _FakeCache()
    centres = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    obj = DistillObjective("feature+logit", student_dim=2, num_classes=3, teacher=CachedTeacher(cache),
                           centres=centres, weights={"feature": 2.0, "logit": 0.5}, temperature=2.0)
    emb = torch.randn(4, 2, requires_grad=True)
    batch = {"labels": torch.tensor([0, 1, 2, 0]), "indices": torch.tensor([3, 1, 7, 9]),
             "flipped": torch.tensor([True, False, True, False])}
    out = obj(emb, batch)
    assert set(out) == {"loss", "ce", "feature", "logit"} and cache.calls == 1
    t = cache.table[[3, 1, 7, 9], [1, 0, 1, 0]]
    p = obj.proj(emb)
    assert out["feature"].item() == pytest.approx(F_()(p, t).item(), rel=1e-6)
    assert out["logit"].item() == pytest.approx(L_(centres, temperature=2.0)(p, t).item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx((out["ce"] + 2.0 * out["feature"] + 0.5 * out["logit"]).item(), rel=1e-6)
    out["loss"].backward()
    assert obj.proj.weight.grad is not None and emb.grad is not None
    assert obj.proj.weight.shape == (4, 2)  # student 2-d -> teacher 4-d


def test_objective_adadistill_replaces_margin_head_and_none_needs_no_teacher():
    obj = DistillObjective("adadistill", student_dim=4, num_classes=3, teacher=lambda b: torch.randn(2, 4))
    assert not hasattr(obj, "head") and isinstance(obj.proj, torch.nn.Identity)
    out = obj(torch.randn(2, 4), {"labels": torch.tensor([0, 2])})
    assert set(out) == {"loss", "adadistill", "adadistill_alpha"}
    plain = DistillObjective("none", student_dim=4, num_classes=3)
    assert set(plain(torch.randn(2, 4), {"labels": torch.tensor([0, 2])})) == {"loss", "ce"}
    with pytest.raises(FacekdError, match="needs a teacher"):
        DistillObjective("feature", student_dim=4, num_classes=3)
    with pytest.raises(FacekdError, match="centres"):
        DistillObjective("logit", student_dim=4, num_classes=3, teacher=lambda b: None, teacher_dim=4)


def test_online_teacher_renormalises_to_teacher_preprocessing_and_stays_frozen():
    from distill.objective import OnlineTeacher

    class Probe(torch.nn.Module):
        embedding_dim = 3
        preprocessing = {"input_size": [4, 4], "channel_order": "BGR", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.seen = None

        def forward(self, x):
            self.seen = x
            return x.mean(dim=(2, 3)) * self.w

    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float()
    student_pre = {"input_size": [8, 8], "channel_order": "RGB", "mean": [127.5] * 3, "std": [127.5] * 3}
    probe = Probe()
    teacher = OnlineTeacher(probe, student_preprocessing=student_pre)
    out = teacher({"images": (pixels - 127.5) / 127.5})
    expected = torch.nn.functional.interpolate(pixels.flip(1), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probe.seen, expected, rtol=1e-5, atol=1e-3)
    assert out.shape == (2, 3) and not out.requires_grad and not probe.w.requires_grad
    # the teacher is not part of the objective's parameters or state
    obj = DistillObjective("feature", student_dim=3, num_classes=2, teacher=teacher)
    assert not any(k.startswith("teacher") for k in obj.state_dict())


# ------------------------------------------------------------------------------------------- several teachers

def test_blocked_feature_and_logit_kd_are_the_mean_of_the_per_teacher_losses() -> None:
    import torch.nn.functional as F

    from distill.losses import FeatureKD, LogitKD

    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    t1, t2 = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    c1, c2 = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    s, t, c = torch.cat([s1, s2], 1), torch.cat([t1, t2], 1), torch.cat([c1, c2], 1)
    for metric in ("cosine", "mse"):
        expected = (FeatureKD(metric)(s1, t1) + FeatureKD(metric)(s2, t2)) / 2
        assert torch.allclose(FeatureKD(metric, blocks=(4, 3))(s, t), expected, atol=1e-6)

    def cos_logits(x, centres):  # by hand: k * cos(x_i, c_j)
        return 8.0 * F.normalize(x, dim=1) @ F.normalize(centres, dim=1).T

    z_s = (cos_logits(s1, c1) + cos_logits(s2, c2)) / 2
    z_t = (cos_logits(t1, c1) + cos_logits(t2, c2)) / 2
    p_t = torch.softmax(z_t / 2.0, 1)
    expected = 4.0 * (p_t * (p_t.log() - torch.log_softmax(z_s / 2.0, 1))).sum(1).mean()
    blocked = LogitKD(c, temperature=2.0, scale=8.0, blocks=(4, 3))
    assert torch.allclose(blocked(s, t), expected, atol=1e-5)
    single = LogitKD(c1, temperature=2.0, scale=8.0)  # one block = the single-teacher formula
    assert torch.allclose(LogitKD(c1, temperature=2.0, scale=8.0, blocks=(4,))(s1, t1), single(s1, t1))


def test_teacher_ensemble_is_unit_norm_and_its_gram_is_the_mean_of_the_teachers() -> None:
    import torch.nn.functional as F

    from distill.objective import DistillObjective, TeacherEnsemble

    g = torch.Generator().manual_seed(1)
    t1, t2 = torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)

    class Source:
        def __init__(self, t):
            self.t, self.embedding_dim = t, t.shape[1]

        def __call__(self, batch):
            return self.t

    ens = TeacherEnsemble([Source(t1), Source(t2)])
    t = ens({})
    assert ens.blocks == (4, 6) and t.shape == (5, 10)
    assert torch.allclose(t.norm(dim=1), torch.ones(5), atol=1e-6)
    grams = [F.normalize(x, dim=1) @ F.normalize(x, dim=1).T for x in (t1, t2)]
    assert torch.allclose(t @ t.T, (grams[0] + grams[1]) / 2, atol=1e-6)
    # the student's projection covers both teachers even when d_s equals their sum; AdaDistill is refused
    obj = DistillObjective("feature", student_dim=10, num_classes=3, teacher=ens)
    assert isinstance(obj.proj, torch.nn.Linear) and obj.proj.out_features == 10
    with pytest.raises(FacekdError, match="adadistill distils one teacher"):
        DistillObjective("adadistill", student_dim=10, num_classes=3, teacher=ens)
