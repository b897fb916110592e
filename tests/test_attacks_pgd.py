"""PGD and FGSM: the step and projection against NumPy, strength on a trained model,
BatchNorm isolation, fresh random starts, and no retracing."""

import keras
import numpy as np
import pytest

from again_tf import evaluation
from again_tf.attacks import FGSM, PGD, losses


def linear_model(w, b):
    model = keras.Sequential([keras.Input((2, 2, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(w.shape[1])])
    model.layers[-1].set_weights([w, b])
    return model


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ce_input_grad(x, y, w, b):
    """∇ₓ CE(xW + b, y) = (softmax − onehot) Wᵀ, per example."""
    flat = x.reshape(len(x), -1)
    p = np_softmax(flat @ w + b)
    p[np.arange(len(y)), y] -= 1
    return (p @ w.T).reshape(x.shape)


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    x = rng.uniform(0.2, 0.8, size=(6, 2, 2, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=6)
    return linear_model(w, b), x, y, w, b


def test_losses_match_numpy():
    z = np.array([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [1.0, 1.0, 4.0]], np.float32)
    y = np.array([0, 0, 2])
    ce = -np.log(np_softmax(z)[np.arange(3), y])
    np.testing.assert_allclose(losses.cross_entropy(z, y), ce, rtol=1e-5)
    margin = np.array([1.0 - 2.0, 3.0 - 0.5, 1.0 - 4.0])
    np.testing.assert_allclose(losses.cw_margin(z, y), margin, rtol=1e-6)
    np.testing.assert_allclose(losses.cw_margin(z, y, confidence=1.0), np.minimum(margin, 1.0))


def test_fgsm_step_matches_numpy(toy):
    model, x, y, w, b = toy
    eps = 0.05
    expected = np.clip(x + eps * np.sign(np_ce_input_grad(x, y, w, b)), 0, 1)
    np.testing.assert_allclose(FGSM(model, eps=eps)(x, y), expected, atol=1e-6)


def test_targeted_step_descends(toy):
    model, x, _, w, b = toy
    target = np.full(len(x), 2)
    expected = np.clip(x - 0.05 * np.sign(np_ce_input_grad(x, target, w, b)), 0, 1)
    np.testing.assert_allclose(FGSM(model, eps=0.05, targeted=True)(x, target), expected,
                               atol=1e-6)


def test_l2_pgd_matches_numpy(toy):
    model, x, y, w, b = toy
    eps, alpha = 0.3, 0.2
    x_np = x.copy()
    for _ in range(3):
        g = np_ce_input_grad(x_np, y, w, b)
        x_np = x_np + alpha * g / np.linalg.norm(g.reshape(len(g), -1), axis=1)[:, None, None, None]
        d = x_np - x
        n = np.linalg.norm(d.reshape(len(d), -1), axis=1)[:, None, None, None]
        x_np = np.clip(x + d * np.minimum(1, eps / n), 0, 1)
    got = PGD(model, eps=eps, step_size=alpha, steps=3, norm="l2", random_start=False)(x, y)
    np.testing.assert_allclose(got, x_np, atol=1e-5)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_stays_in_ball_and_box(trained_cnn, fashion_test, norm, eps):
    x, y = fashion_test[0][:128], fashion_test[1][:128]
    x_adv = PGD(trained_cnn, eps=eps, step_size=eps / 4, steps=5, norm=norm)(x, y).numpy()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    d = (x_adv - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert size.max() <= eps + 1e-5
    assert size.mean() > 0.5 * eps  # it really moved


def test_attacks_lower_accuracy_and_pgd_beats_fgsm(trained_cnn, fashion_test):
    x, y = fashion_test
    r = evaluation.evaluate(trained_cnn, x, y, ["clean", "fgsm", "pgd10", "pgd20", "cw"], eps=0.1)
    acc = {k: v["accuracy"] for k, v in r.items()}
    assert acc["clean"] > 0.7
    assert acc["pgd20"] < acc["clean"] - 0.4
    assert acc["pgd20"] <= acc["fgsm"]
    assert acc["pgd20"] <= acc["pgd10"] + 0.02
    assert acc["cw"] < acc["clean"] - 0.4


def test_targeted_pgd_reaches_targets(trained_cnn, fashion_test):
    x, y = fashion_test[0][:200], fashion_test[1][:200]
    target = (y + 1) % 10
    x_adv = PGD(trained_cnn, eps=0.2, step_size=0.02, steps=20, targeted=True)(x, target)
    hit = np.mean(trained_cnn.predict(x_adv, verbose=0).argmax(1) == target)
    assert hit > 0.5


@pytest.mark.parametrize("training", [False, True])
def test_attack_never_changes_batchnorm_statistics(trained_cnn, fashion_test, training):
    before = [v.numpy().copy() for v in trained_cnn.non_trainable_variables]
    assert before, "the fixture model should have BatchNorm statistics"
    PGD(trained_cnn, eps=0.1, steps=3, training=training)(*[a[:64] for a in fashion_test])
    for b, v in zip(before, trained_cnn.non_trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


@pytest.mark.parametrize("jit", [False, True])
def test_random_start_is_fresh_each_call_and_compiled_once(trained_cnn, fashion_test, jit):
    x, y = fashion_test[0][:32], fashion_test[1][:32]
    attack = PGD(trained_cnn, eps=0.1, step_size=0.01, steps=1, seed=3, jit_compile=jit)
    a, b = attack(x, y).numpy(), attack(x, y).numpy()
    assert not np.allclose(a, b)
    for i in range(3):
        attack(x[i:i + 16], y[i:i + 16])
    assert attack.compiled(None, x.shape[1:]).experimental_get_tracing_count() <= 2


def test_a_custom_loss_is_compiled_too_and_equals_the_eager_attack(trained_cnn, fashion_test):
    """One call contract: `attack(x, y, loss_fn)` is the compiled `perturb(x, y, loss_fn)`,
    traced once per loss function for any batch size."""
    x, y = fashion_test[0][:24], fashion_test[1][:24]
    attack = PGD(trained_cnn, eps=0.1, step_size=0.02, steps=3, random_start=False)

    def margin_of_logits(x_adv, labels):  # a loss the attack does not have by itself
        return losses.cw_margin(trained_cnn(x_adv, training=False), labels)

    got = attack(x, y, margin_of_logits).numpy()
    want = attack.perturb(x, y, margin_of_logits).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, attack(x, y).numpy(), atol=1e-4)  # not the CE attack
    for n in (7, 24, 1):
        attack(x[:n], y[:n], margin_of_logits)
    assert attack.compiled(margin_of_logits, x.shape[1:]).experimental_get_tracing_count() == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        PGD(None, eps=8)
    with pytest.raises(ValueError, match="norm"):
        PGD(None, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="random_start"):
        PGD(None, eps=0.1, random_start="gaussian")
    with pytest.raises(ValueError, match="labels"):
        PGD(None, eps=0.1)(np.zeros((1, 2, 2, 1), np.float32), None)
    with pytest.raises(ValueError, match="Unknown attack"):
        evaluation.parse_attack("pgd", None, 0.1)
