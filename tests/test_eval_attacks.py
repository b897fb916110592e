"""Tests of C&W-L2, Temperature-PGD and the extended `again_tf.evaluation` API."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import evaluation
from again_tf.attacks import CWL2, PGD, AutoAttack, TemperaturePGD, losses
from again_tf.attacks.temperature_pgd import DEFAULT_TEMPERATURE


def predict(model, x):
    return model.predict(x, verbose=0).argmax(1)


def l2(x_adv, x):
    return np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)


@pytest.fixture(scope="module")
def batch(fashion_test):
    x, y = fashion_test
    return x[:48], y[:48]


# ----------------------------------------------------------------------------- C&W-L2
def test_cwl2_larger_c_more_success_and_larger_perturbations(trained_cnn, batch):
    x, y = batch
    ok = predict(trained_cnn, x) == y
    success, size = [], []
    for c in (0.01, 0.3, 10.0):
        x_adv = CWL2(trained_cnn, binary_search_steps=1, initial_const=c,
                     max_iterations=60)(x, y).numpy()
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        fooled = (predict(trained_cnn, x_adv) != y) & ok
        success.append(fooled.sum() / ok.sum())
        size.append(l2(x_adv, x)[fooled].mean() if fooled.any() else 0.0)
        # Examples not fooled get their clean input back.
        np.testing.assert_array_equal(x_adv[~fooled & ok], x[~fooled & ok])
    assert success[0] < success[1] <= success[2]
    assert success[2] > 0.7
    assert size[1] < size[2]


def test_cwl2_binary_search_finds_smaller_perturbations(trained_cnn, batch):
    x, y = batch
    ok = predict(trained_cnn, x) == y
    fixed = CWL2(trained_cnn, binary_search_steps=1, initial_const=10.0, max_iterations=60)
    search = CWL2(trained_cnn, binary_search_steps=5, initial_const=10.0, max_iterations=60)
    a, b = fixed(x, y).numpy(), search(x, y).numpy()
    fa = (predict(trained_cnn, a) != y) & ok
    fb = (predict(trained_cnn, b) != y) & ok
    assert fb.sum() >= fa.sum()  # the search keeps the first step's successes
    both = fa & fb
    assert both.sum() > 10
    assert np.all(l2(b, x)[both] <= l2(a, x)[both] + 1e-5)
    assert l2(b, x)[both].mean() < 0.9 * l2(a, x)[both].mean()


def test_cwl2_eps_filter_keeps_only_close_examples(trained_cnn, batch):
    x, y = batch
    free = CWL2(trained_cnn, binary_search_steps=3, initial_const=1.0, max_iterations=40)
    x_free = free(x, y).numpy()
    sizes = l2(x_free, x)
    eps = float(np.median(sizes[sizes > 0]))
    x_eps = CWL2(trained_cnn, eps=eps, norm="l2", binary_search_steps=3, initial_const=1.0,
                 max_iterations=40)(x, y).numpy()
    assert l2(x_eps, x).max() <= eps + 1e-5
    far = sizes > eps
    np.testing.assert_array_equal(x_eps[far], x[far])
    near = (sizes > 0) & ~far
    np.testing.assert_allclose(x_eps[near], x_free[near], atol=1e-6)


# ----------------------------------------------------------------------------- T-PGD
def test_temperature_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 5)).astype(np.float32) * 4
    y = rng.integers(0, 5, 8)
    for t in (0.5, 1.0, 3.0):
        zt = z / t
        ref = np.log(np.exp(zt).sum(1)) - zt[np.arange(8), y]
        np.testing.assert_allclose(losses.temperature_cross_entropy(z, y, t), ref, rtol=1e-5)


def test_temperature_pgd(trained_cnn, batch):
    x, y = batch
    eps = 0.03
    # T = 1 is exactly PGD (same seed, same random start).
    a = TemperaturePGD(trained_cnn, eps, eps / 4, 5, temperature=1.0, seed=3)(x, y).numpy()
    b = PGD(trained_cnn, eps, eps / 4, 5, seed=3)(x, y).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    x_adv = TemperaturePGD(trained_cnn, eps, eps / 4, 20, seed=0)(x, y).numpy()
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    clean = np.mean(predict(trained_cnn, x) == y)
    assert np.mean(predict(trained_cnn, x_adv) == y) < clean - 0.3
    # The temperature changes the attack.
    c = TemperaturePGD(trained_cnn, eps, eps / 4, 5, temperature=0.1, seed=3)(x, y).numpy()
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match="temperature"):
        TemperaturePGD(trained_cnn, eps, temperature=0.0)


# ----------------------------------------------------------------------------- evaluation
def test_parse_attack_names():
    eps = 0.1
    kinds = {"clean": type(None), "pgd7": PGD, "cw": PGD, "tpgd": TemperaturePGD,
             "tpgd5": TemperaturePGD, "aa": AutoAttack, "aa_rand": AutoAttack,
             "aa_plus": AutoAttack, "cwl2": CWL2}
    for name, kind in kinds.items():
        assert isinstance(evaluation.parse_attack(name, None, eps), kind), name
    assert evaluation.parse_attack("tpgd5", None, eps).steps == 5
    assert evaluation.parse_attack("tpgd", None, eps).temperature == DEFAULT_TEMPERATURE
    assert evaluation.parse_attack("tpgd", None, eps, temperature=2.0).temperature == 2.0
    # The name that cannot be taken for TRADES' KL PGD (torchattacks' and MAIR's TPGD);
    # tpgd stays as its alias.
    renamed = evaluation.parse_attack("temp_pgd7", None, eps, temperature=2.0)
    assert isinstance(renamed, TemperaturePGD)
    assert (renamed.steps, renamed.temperature) == (7, 2.0)
    assert evaluation.parse_attack("temp_pgd", None, eps).steps == 20
    assert evaluation.parse_attack("aa_rand", None, eps).version == "rand"
    assert evaluation.parse_attack("aa", None, eps, n_iter=7).components["apgd-ce"].n_iter == 7
    assert evaluation.parse_attack("square", None, eps, n_queries=9).n_queries == 9
    assert evaluation.parse_attack("fab-t", None, eps).fab_targeted
    assert not evaluation.parse_attack("fab", None, eps).fab_targeted
    assert evaluation.parse_attack("apgd-dlr", None, eps).loss_name == "dlr"
    assert evaluation.parse_attack("cwl2", None, eps, cwl2_steps=11).max_iterations == 11
    for bad in ("pgd", "aa_fast", "tpgd0", "temp_pgd0", "temppgd", "apgd"):
        with pytest.raises(ValueError, match="(?i)attack"):
            evaluation.parse_attack(bad, None, eps)
    with pytest.raises(ValueError, match="option"):
        evaluation.parse_attack("pgd20", None, eps, n_queris=3)


def test_evaluate_reports_predictions_worst_case_and_autoattack(trained_cnn, batch):
    x, y = batch
    r = evaluation.evaluate(trained_cnn, x, y, ["clean", "pgd10", "tpgd10", "aa"], eps=0.03,
                            n_iter=10, n_queries=50, n_target_classes=2)
    for name, entry in r.items():
        np.testing.assert_array_equal(entry["correct"], entry["predictions"] == y)
        assert entry["accuracy"] == entry["correct"].mean()
    assert r["clean"]["accuracy"] > 0.7
    assert list(r["aa"]["accuracy_after"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    worst = evaluation.worst_case(r, ["pgd10", "tpgd10", "aa"])
    np.testing.assert_array_equal(
        worst["correct"], r["pgd10"]["correct"] & r["tpgd10"]["correct"] & r["aa"]["correct"])
    assert worst["accuracy"] <= min(r[n]["accuracy"] for n in ("pgd10", "tpgd10", "aa"))


def test_objective_hook_for_adaptive_evaluation(trained_cnn, batch):
    """A registered objective replaces the gradient attacks' loss (the adaptive-eval place)."""
    x, y = batch
    calls = []

    def builder(model):
        def loss_fn(x_adv, labels):
            calls.append(1)
            return -losses.cross_entropy(model(x_adv), labels)  # helps the model: no attack
        return loss_fn

    evaluation.OBJECTIVES["helpful"] = builder
    try:
        main = evaluation.evaluate(trained_cnn, x, y, ["pgd10"], eps=0.03)
        helpful = evaluation.evaluate(trained_cnn, x, y, ["pgd10"], eps=0.03, loss="helpful")
    finally:
        del evaluation.OBJECTIVES["helpful"]
    assert calls
    assert helpful["pgd10"]["accuracy"] > main["pgd10"]["accuracy"] + 0.3
    for bad in ("bogus", "aux"):  # unknown; "aux" needs auxiliary heads, this model has none
        with pytest.raises(ValueError, match="loss"):
            evaluation.evaluate(trained_cnn, x, y, ["pgd10"], eps=0.03, loss=bad)


def test_format_markdown():
    text = evaluation.format_markdown([{"attack": "pgd20", "accuracy": 0.5}],
                                      ["attack", "accuracy"])
    assert text.splitlines() == ["| attack | accuracy |", "|---|---|", "| pgd20 | 0.5000 |"]


def test_subset_attack_labels_dtype(trained_cnn, batch):
    x, y = batch
    attack = evaluation.parse_attack("apgd-ce", trained_cnn, 0.03, n_iter=2)
    a = attack(x[:8], y[:8].astype(np.int64)).numpy()
    b = attack(tf.constant(x[:8]), tf.constant(y[:8], tf.int32)).numpy()
    assert a.shape == b.shape == x[:8].shape


def test_evaluate_takes_attack_objects(trained_cnn, batch):
    x, y = batch
    by_name = evaluation.evaluate(trained_cnn, x, y, ["pgd5"], eps=0.1, step_size=0.025)
    attack = PGD(trained_cnn, 0.1, 0.025, 5, seed=0)
    by_object = evaluation.evaluate(trained_cnn, x, y, ["clean", attack], eps=0.1)
    assert list(by_object) == ["clean", repr(attack)]
    np.testing.assert_array_equal(by_object[repr(attack)]["correct"], by_name["pgd5"]["correct"])
    assert by_object[repr(attack)]["accuracy"] < by_object["clean"]["accuracy"]
    other = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    with pytest.raises(ValueError, match="another model"):
        evaluation.evaluate(trained_cnn, x, y, [PGD(other, 0.1, 0.025, 5)])
    with pytest.raises(ValueError, match="expected attack names"):
        evaluation.evaluate(trained_cnn, x, y, [5])
