"""Tests of the native-TF AutoAttack: DLR losses, APGD(-T), FAB(-T) and its projections,
Square, and the AutoAttack cascade, on a briefly trained small CNN (conftest)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import linprog

from again_tf.attacks import APGD, APGDT, FAB, PGD, AutoAttack, Square, losses
from again_tf.attacks.fab import projection_l2, projection_linf

EPS = 0.03  # on the normally trained CNN: PGD-20 leaves ~20-30 % robust accuracy


def predict(model, x):
    return model.predict(x, verbose=0).argmax(1)


def sizes(x_adv, x, norm):
    d = (x_adv - x).reshape(len(x), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


@pytest.fixture(scope="module")
def batch(fashion_test):
    x, y = fashion_test
    return x[:200], y[:200]


# ----------------------------------------------------------------------------- losses
def test_dlr_losses_match_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(16, 10)).astype(np.float32) * 3
    y = rng.integers(0, 10, 16)
    t = (y + rng.integers(1, 10, 16)) % 10
    s = np.sort(z, axis=1)
    zy = z[np.arange(16), y]
    other = np.where(np.eye(10, dtype=bool)[y], -np.inf, z).max(1)
    dlr = -(zy - other) / (s[:, -1] - s[:, -3] + 1e-12)
    tdlr = -(zy - z[np.arange(16), t]) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12)
    np.testing.assert_allclose(losses.dlr(z, y), dlr, rtol=1e-5)
    np.testing.assert_allclose(losses.targeted_dlr(z, y, t), tdlr, rtol=1e-5)
    np.testing.assert_allclose(losses.margin(z, y), zy - other, rtol=1e-6)
    np.testing.assert_allclose(losses.get("dlr")(z, y), dlr, rtol=1e-5)
    # DLR is invariant to shifting and scaling the logits (why it does not saturate).
    np.testing.assert_allclose(losses.dlr(3 * z + 7, y), dlr, rtol=1e-4)


# ----------------------------------------------------------------------------- APGD
@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 1.0)])
def test_apgd_stays_in_ball_and_box(trained_cnn, batch, norm, eps):
    x, y = batch[0][:64], batch[1][:64]
    x_adv = APGD(trained_cnn, eps=eps, norm=norm, n_iter=10, seed=0)(x, y).numpy()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert sizes(x_adv, x, norm).max() <= eps + 1e-5
    fooled = predict(trained_cnn, x_adv) != y
    # Points reported as adversarial really are; the rest keep their clean input.
    assert fooled.any()
    untouched = ~fooled & (predict(trained_cnn, x) == y)
    np.testing.assert_array_equal(x_adv[untouched], x[untouched])


def test_apgd_ce_at_least_as_strong_as_pgd20(trained_cnn, batch):
    x, y = batch
    pgd = np.mean(predict(trained_cnn, PGD(trained_cnn, EPS, EPS / 4, 20, seed=0)(x, y).numpy())
                  == y)
    apgd = np.mean(predict(trained_cnn, APGD(trained_cnn, EPS, n_iter=20, seed=0)(x, y).numpy())
                   == y)
    clean = np.mean(predict(trained_cnn, x) == y)
    assert pgd < clean - 0.3  # the budget matters on this model
    assert apgd <= pgd


def test_apgd_step_size_schedule_matches_official_checkpoints():
    a = APGD(None, eps=0.1, n_iter=100)
    assert (a.n_iter_2, a.n_iter_min, a.size_decr) == (22, 6, 3)
    # The checkpoints the countdown produces: 22, 41, 57, 70, 80, 87, 93, 99 (p_j · 100).
    marks, k, t = [], a.n_iter_2, 0
    while t + k <= 100:
        t += k
        marks.append(t)
        k = max(k - a.size_decr, a.n_iter_min)
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert marks == [round(v * 100) for v in p[1:] if v <= 1.0]


def test_apgd_targeted_and_dlr_lower_accuracy(trained_cnn, batch):
    x, y = batch[0][:100], batch[1][:100]
    clean = np.mean(predict(trained_cnn, x) == y)
    for attack in (APGDT(trained_cnn, EPS, n_iter=10, n_target_classes=3, seed=0),
                   APGD(trained_cnn, EPS, loss="dlr", n_iter=10, seed=0)):
        x_adv = attack(x, y).numpy()
        assert np.mean(predict(trained_cnn, x_adv) == y) < clean - 0.3, attack
        assert sizes(x_adv, x, "linf").max() <= EPS + 1e-5


def test_apgd_compiles_once_for_any_batch_size(trained_cnn, batch):
    attack = APGD(trained_cnn, EPS, n_iter=2, seed=0)
    for n in (32, 7, 1, 19):
        attack(batch[0][:n], batch[1][:n])
    assert attack.compiled(None, batch[0].shape[1:]).experimental_get_tracing_count() == 1


# ----------------------------------------------------------------------------- FAB
def _linf_projection_lp(t, w, b):
    """min ‖d‖∞ s.t. w·(t+d) = b, 0 ≤ t+d ≤ 1, by linear programming (variables d, s)."""
    n = len(t)
    c = np.zeros(n + 1)
    c[-1] = 1.0
    a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.append(w, 0.0)[None],
                  b_eq=[b - w @ t], bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)])
    return res.x[-1] if res.success else None


def _l2_projection_exact(t, w, b):
    """min ‖d‖₂ s.t. w·(t+d) = b, box: d(λ) = clip(−λw, −t, 1−t), bisection on λ."""
    target = b - w @ t
    lo, hi = -1e6, 1e6
    for _ in range(200):
        lam = (lo + hi) / 2
        val = w @ np.clip(-lam * w, -t, 1 - t)
        lo, hi = (lam, hi) if val > target else (lo, lam)
    d = np.clip(-lo * w, -t, 1 - t)
    return np.linalg.norm(d) if abs(w @ d - target) < 1e-6 else None


def test_fab_projections_are_minimal_and_on_the_hyperplane():
    rng = np.random.default_rng(1)
    n, dim = 24, 12
    t = rng.uniform(size=(n, dim))
    w = rng.normal(size=(n, dim))
    w[0, :4] = 0.0  # zero coordinates are never moved
    b = (w * rng.uniform(size=(n, dim))).sum(1)  # a hyperplane through a box point: feasible
    for project, reference, norm in ((projection_linf, _linf_projection_lp, np.inf),
                                     (projection_l2, _l2_projection_exact, 2)):
        d = project(tf.constant(t, tf.float32), tf.constant(w, tf.float32),
                    tf.constant(b, tf.float32)).numpy().astype(np.float64)
        assert np.all(t + d >= -1e-5) and np.all(t + d <= 1 + 1e-5)
        np.testing.assert_allclose(((t + d) * w).sum(1), b, atol=2e-4)
        assert np.all(d[0, :4] == 0)
        best = np.array([reference(t[i], w[i], b[i]) for i in range(n)])
        np.testing.assert_allclose(np.linalg.norm(d, ord=norm, axis=1), best, rtol=2e-3,
                                   atol=1e-5)


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 1.0)])
def test_fab_t_finds_adversarial_examples_within_eps(trained_cnn, batch, norm, eps):
    x, y = batch[0][:64], batch[1][:64]
    clean_ok = predict(trained_cnn, x) == y
    x_adv = FAB(trained_cnn, eps, norm=norm, targeted=True, n_iter=20, n_target_classes=3,
                seed=0)(x, y).numpy()
    fooled = (predict(trained_cnn, x_adv) != y) & clean_ok
    assert fooled.mean() > 0.3
    assert sizes(x_adv, x, norm).max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_fab_untargeted_finds_small_perturbations(trained_cnn, batch):
    x, y = batch[0][:32], batch[1][:32]
    x_adv = FAB(trained_cnn, 0.3, targeted=False, n_iter=20, seed=0)(x, y).numpy()
    fooled = predict(trained_cnn, x_adv) != y
    assert fooled.mean() > 0.7
    # FAB minimizes the norm: far below the ε allowed.
    assert np.median(sizes(x_adv[fooled], x[fooled], "linf")) < 0.15


# ----------------------------------------------------------------------------- Square
class NoGradient(keras.Model):
    """Wraps a classifier; any gradient through it raises (to prove an attack uses none)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def call(self, x, training=False):
        @tf.custom_gradient
        def guard(v):
            def grad(dy):
                raise RuntimeError("a gradient of the model was requested")
            return tf.identity(v), grad
        return self.inner(guard(x), training=training)


def test_square_uses_no_gradient_and_stays_in_ball(trained_cnn, batch):
    x, y = batch[0][:64], batch[1][:64]
    guarded = NoGradient(trained_cnn)
    with pytest.raises(Exception, match="gradient of the model"):
        APGD(guarded, EPS, n_iter=2)(x[:4], y[:4])  # the guard works
    # Seeds 0-2 on this model: linf 200 queries lower accuracy by only 0.09-0.11, 400 by
    # 0.16-0.17.
    for norm, eps in (("linf", EPS), ("l2", 1.0)):
        x_adv = Square(guarded, eps, norm=norm, n_queries=400, seed=0)(x, y).numpy()
        assert sizes(x_adv, x, norm).max() <= eps + 1e-5
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        clean = np.mean(predict(trained_cnn, x) == y)
        assert np.mean(predict(trained_cnn, x_adv) == y) < clean - 0.1, norm


# ----------------------------------------------------------------------------- cascade
def test_autoattack_is_the_pointwise_worst_case(trained_cnn, batch):
    x, y = batch[0][:100], batch[1][:100]
    aa = AutoAttack(trained_cnn, EPS, n_iter=20, n_queries=100, n_target_classes=3, seed=0)
    r = aa.run(x, y, batch_size=64)
    after = list(r["accuracy_after"].values())
    assert list(r["accuracy_after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r["clean_accuracy"] >= after[0] and all(a >= b for a, b in zip(after, after[1:]))
    assert r["robust_accuracy"] == after[-1]
    # The reported result is real: re-predicting the returned points gives it exactly.
    robust = predict(trained_cnn, r["x_adv"]) == y
    np.testing.assert_array_equal(robust, r["robust"])
    assert np.mean(robust) == r["robust_accuracy"]
    assert sizes(r["x_adv"], x, "linf").max() <= EPS + 1e-5
    assert set(r["fooled_by"][~robust]) <= {"clean", "apgd-ce", "apgd-t", "fab-t", "square"}
    # Point-wise worst case ≤ each component's robust accuracy run alone, and ≤ PGD-20.
    for name, attack in aa.components.items():
        alone = np.mean(predict(trained_cnn, attack(x, y).numpy()) == y)
        assert r["robust_accuracy"] <= alone + 1e-12, name
    pgd = np.mean(predict(trained_cnn, PGD(trained_cnn, EPS, EPS / 4, 20, seed=0)(x, y).numpy())
                  == y)
    assert r["robust_accuracy"] <= pgd


def test_autoattack_versions_and_errors(trained_cnn):
    rand = AutoAttack(trained_cnn, EPS, version="rand")
    assert rand.attacks == ("apgd-ce", "apgd-dlr")
    assert all(c.eot_iter == 20 and c.n_restarts == 1 for c in rand.components.values())
    plus = AutoAttack(trained_cnn, EPS, version="plus")
    assert plus.components["apgd-ce"].n_restarts == 5 and plus.components["fab"].n_restarts == 5
    std = AutoAttack(trained_cnn, EPS, norm="l2")
    assert std.components["square"].n_queries == 5000 and std.components["square"].p_init == 0.8
    assert std.components["apgd-t"].n_target_classes == 9
    assert all(c.norm == "l2" for c in std.components.values())
    with pytest.raises(ValueError, match="version"):
        AutoAttack(trained_cnn, EPS, version="fast")
    with pytest.raises(ValueError, match="eps"):
        APGD(trained_cnn, eps=2.0)


def test_rand_version_averages_gradients_over_eot(trained_cnn, batch):
    x, y = batch[0][:16], batch[1][:16]
    attack = APGD(trained_cnn, EPS, n_iter=2, eot_iter=3)
    _, _, grad3 = attack.loss_and_grad(tf.constant(x), tf.constant(y, tf.int32), None, None)
    single = APGD(trained_cnn, EPS, n_iter=2)
    _, _, grad1 = single.loss_and_grad(tf.constant(x), tf.constant(y, tf.int32), None, None)
    # A deterministic model: the EOT average equals one gradient.
    np.testing.assert_allclose(grad3.numpy(), grad1.numpy(), rtol=1e-4, atol=1e-7)
