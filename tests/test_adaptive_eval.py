"""Adaptive evaluation of models with auxiliary heads: the per-example worst case over the
main, combined and aux objectives, in `evaluation.evaluate`, evaluate.py and
`AdversarialModel.test_step`; models without auxiliary heads pay one attack."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import evaluation, models
from again_tf.attacks import PGD, losses, objectives
from again_tf.defenses import AdversarialModel
from again_tf.models.base import forward
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.1


@pytest.fixture(scope="module", params=["again_pgd", "cas"])
def aux_adv(request, fashion_train):
    """A width-8 SmallCNN with ASE (again_pgd) or CAS masks, PGD-3 trained 3 epochs on
    1,500 Fashion-MNIST images; its validation attack is PGD-5 from no random start."""
    keras.utils.set_random_seed(0)
    net = models.SmallCNN(10, width=8, hidden=64, mean=(0.286,), std=(0.353,))
    adv = AdversarialModel(net, defense=request.param, eps=EPS, step_size=EPS / 3, steps=3,
                           eval_steps=5, eval_step_size=EPS / 4)
    adv.compile(optimizer=keras.optimizers.Adam(2e-3))
    x, y = fashion_train
    adv.fit(x[:1500], y[:1500], batch_size=64, epochs=3, verbose=0)
    adv.eval_attack.random_start = "none"  # deterministic: compared with a direct run below
    return adv


@pytest.fixture(scope="module")
def test_set(fashion_test):
    x, y = fashion_test
    return x[:300], y[:300]


def numpy_ce(z, y):
    z = z - z.max(-1, keepdims=True)
    return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(-1)))


def numpy_cw(z, y):
    other = np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z).max(-1)
    return np.minimum(other - z[np.arange(len(y)), y], 50.0)


@pytest.mark.parametrize("name", ["ce", "cw"])
def test_head_objectives_match_numpy(name):
    rng = np.random.default_rng(0)
    main, a1, a2 = (rng.normal(size=(6, 10)).astype(np.float32) * 3 for _ in range(3))
    y = rng.integers(0, 10, 6)
    outputs = {"logits": tf.constant(main), "aux_logits": [tf.constant(a1), tf.constant(a2)]}
    loss, ref = (losses.cross_entropy, numpy_ce) if name == "ce" else (losses.cw_margin,
                                                                        numpy_cw)
    aux = (ref(a1, y) + ref(a2, y)) / 2
    expected = {"main": ref(main, y), "aux": aux, "combined": ref(main, y) + 1.5 * aux}
    for objective, value in expected.items():
        got = objectives.head_objective(objective, loss, aux_weight=1.5)(outputs, y)
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-5)
    plain = {"logits": tf.constant(main), "aux_logits": []}
    np.testing.assert_allclose(objectives.head_objective("combined", loss)(plain, y),
                               ref(main, y), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="aux"):
        objectives.head_objective("aux", loss)(plain, y)
    with pytest.raises(ValueError, match="objective"):
        objectives.head_objective("both")


def test_adaptive_is_the_per_example_worst_over_objectives(aux_adv, test_set):
    net = aux_adv.model
    x, y = test_set
    assert objectives.num_aux_heads(net, x) == 1
    r = evaluation.evaluate(net, x, y, ["clean", "pgd10", "cw10"], eps=EPS, seed=0)
    main = evaluation.evaluate(net, x, y, ["pgd10"], eps=EPS, seed=0, loss="main")["pgd10"]
    assert "by_loss" not in r["clean"]
    for name in ("pgd10", "cw10"):
        e = r[name]
        assert list(e["by_loss"]) == list(evaluation.ADAPTIVE)
        assert evaluation.ADAPTIVE[:3] == ("main", "combined", "aux")
        both = np.logical_and.reduce(list(e["correct_by_loss"].values()))
        np.testing.assert_array_equal(e["correct"], both)
        np.testing.assert_array_equal(e["correct"], e["predictions"] == y)
        assert e["accuracy"] == pytest.approx(both.mean())
        for objective, acc in e["by_loss"].items():
            assert acc == pytest.approx(e["correct_by_loss"][objective].mean())
            assert e["accuracy"] <= acc
    # The adaptive run's main objective is exactly the main-loss evaluation (same seed).
    np.testing.assert_array_equal(r["pgd10"]["correct_by_loss"]["main"], main["correct"])
    acc = r["pgd10"]["by_loss"]
    print(f"\n{aux_adv.defense_name}: clean {r['clean']['accuracy']:.3f}, pgd10 {acc}, "
          f"adaptive {r['pgd10']['accuracy']:.3f}; cw10 {r['cw10']['by_loss']}, "
          f"adaptive {r['cw10']['accuracy']:.3f}")
    # The documented effect: attacking the auxiliary heads beats attacking the main head.
    assert acc["aux"] < acc["main"] - 0.05
    # The gradient through the mask choice reaches what the main head's gradient misses.
    assert acc["main_relaxed"] < acc["main"]
    assert r["pgd10"]["accuracy"] < main["accuracy"] - 0.05


def test_explicit_objectives_run_one_attack_each(aux_adv, test_set):
    net = aux_adv.model
    x, y = test_set[0][:100], test_set[1][:100]
    adaptive = evaluation.evaluate(net, x, y, ["pgd5"], eps=EPS, seed=3)["pgd5"]
    for objective in ("combined", "aux"):
        alone = evaluation.evaluate(net, x, y, ["pgd5"], eps=EPS, seed=3, loss=objective)
        assert "by_loss" not in alone["pgd5"]
        np.testing.assert_array_equal(alone["pgd5"]["correct"],
                                      adaptive["correct_by_loss"][objective])


def test_an_attack_object_evaluated_again_reuses_its_traces(aux_adv, test_set):
    """Each objective's compiled attack is kept by the attack: a second `evaluate` with the
    same attack object traces nothing new and gives the same result."""
    net = aux_adv.model
    x, y = test_set[0][:40], test_set[1][:40]
    attack = PGD(net, EPS, EPS / 4, 2, random_start="none")
    first = evaluation.evaluate(net, x, y, [attack], eps=EPS)
    compiled = dict(attack._compiled)
    traces = {k: f.experimental_get_tracing_count() for k, f in compiled.items()}
    second = evaluation.evaluate(net, x, y, [attack], eps=EPS)
    assert len(compiled) == len(evaluation.ADAPTIVE) and attack._compiled == compiled
    assert {k: f.experimental_get_tracing_count() for k, f in compiled.items()} == traces
    np.testing.assert_array_equal(first[repr(attack)]["correct"],
                                  second[repr(attack)]["correct"])


def test_an_attack_objects_objectives_start_from_its_random_state(aux_adv, test_set):
    """Each objective's run of an attack object starts from the object's random state at
    the call, as the named attack's runs start from `seed`: the same images survive."""
    net = aux_adv.model
    x, y = test_set[0][:100], test_set[1][:100]
    named = evaluation.evaluate(net, x, y, ["pgd3"], eps=EPS, seed=7)["pgd3"]
    attack = evaluation.parse_attack("pgd3", net, EPS, seed=7)
    given = evaluation.evaluate(net, x, y, [attack], eps=EPS, seed=7)[repr(attack)]
    assert list(given["correct_by_loss"]) == list(named["correct_by_loss"])
    for objective, correct in named["correct_by_loss"].items():
        np.testing.assert_array_equal(given["correct_by_loss"][objective], correct,
                                      err_msg=objective)


def test_autoattack_adds_apgd_on_the_other_objectives(aux_adv, test_set):
    net = aux_adv.model
    x, y = test_set[0][:100], test_set[1][:100]
    e = evaluation.evaluate(net, x, y, ["aa"], eps=EPS, n_iter=5, n_queries=20,
                            n_target_classes=2)["aa"]
    after = e["accuracy_after"]
    others = [f"apgd-ce[{o}]" for o in evaluation.ADAPTIVE[1:]]
    assert list(after) == ["apgd-ce", "apgd-t", "fab-t", "square"] + others
    values = list(after.values())
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert e["by_loss"]["main"] == pytest.approx(after["square"])  # AutoAttack alone
    assert e["accuracy"] == pytest.approx(after[others[-1]])
    np.testing.assert_array_equal(
        e["correct"], np.logical_and.reduce(list(e["correct_by_loss"].values())))
    for objective in evaluation.ADAPTIVE[1:]:  # AA ∧ APGD-CE(objective): never above AA
        assert not np.any(e["correct_by_loss"][objective] & ~e["correct_by_loss"]["main"])
    np.testing.assert_array_equal(e["correct"], e["predictions"] == y)
    fooled = set(e["fooled_by"][~e["correct"]])
    assert fooled <= {"clean", "apgd-ce", "apgd-t", "fab-t", "square", *others}
    assert e["accuracy"] < e["by_loss"]["main"]  # the aux heads' attack finds more


def test_model_without_aux_heads_pays_one_attack(trained_cnn, test_set, monkeypatch):
    x, y = test_set[0][:200], test_set[1][:200]
    assert objectives.num_aux_heads(trained_cnn, x) == 0
    main = evaluation.evaluate(trained_cnn, x, y, ["pgd5", "cw5"], eps=0.03, seed=1,
                               loss="main")
    calls = []
    original = evaluation.adversarial
    monkeypatch.setattr(evaluation, "adversarial",
                        lambda *a, **k: calls.append(k.get("loss_fn")) or original(*a, **k))
    adaptive = evaluation.evaluate(trained_cnn, x, y, ["pgd5", "cw5"], eps=0.03, seed=1)
    assert calls == [None, None]  # one attack each, on its own loss
    for name in ("pgd5", "cw5"):
        assert "by_loss" not in adaptive[name]
        np.testing.assert_array_equal(adaptive[name]["correct"], main[name]["correct"])
        np.testing.assert_array_equal(adaptive[name]["predictions"], main[name]["predictions"])
    assert main["pgd5"]["accuracy"] < 0.6  # the attack really ran


def test_validation_robust_accuracy_is_the_worst_over_objectives(aux_adv, test_set):
    net = aux_adv.model
    x, y = test_set
    logs = aux_adv.evaluate(x, y, batch_size=100, return_dict=True, verbose=0)
    attack = PGD(net, EPS, EPS / 4, 5, random_start="none")
    correct = {}
    for objective in objectives.HEAD_OBJECTIVES:
        loss_fn = objectives.objective_fn(net, objective, losses.cross_entropy, 2.0)
        pred = np.concatenate([
            np.argmax(forward(net, attack.perturb(tf.constant(x[i:i + 100]), y[i:i + 100],
                                                  loss_fn))["logits"], -1)
            for i in range(0, len(y), 100)])
        correct[objective] = pred == y
    worst = np.logical_and.reduce(list(correct.values())).mean()
    print(f"\n{aux_adv.defense_name} validation: robust {logs['robust_accuracy']:.3f}, "
          f"direct {worst:.3f}, main only {correct['main'].mean():.3f}")
    assert logs["robust_accuracy"] == pytest.approx(worst, abs=1.01 / len(y))
    assert logs["robust_accuracy"] < correct["main"].mean() - 0.05


def test_evaluate_py_prints_the_breakdown(aux_adv, tmp_path):
    """--loss=adaptive (again_pgd) lists each loss under the worst case; --loss=main (cas)
    attacks the main head only and shows no breakdown."""
    loss = "adaptive" if aux_adv.defense_name == "again_pgd" else "main"
    path = tmp_path / "net.keras"
    aux_adv.model.save(path)
    report = tmp_path / "eval.json"
    run = run_main("evaluate.py", f"--model_path={path}", "--dataset=fashion_mnist",
                   "--attacks=clean,pgd5", "--num_images=100", f"--eps={EPS}",
                   "--classwise=false", "--verbose=0", f"--report={report}", f"--loss={loss}")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.strip().split("  ")[0]: line for line in run.stdout.splitlines()}
    saved = json.loads(report.read_text())
    assert saved["loss"] == loss
    entry = saved["attacks"]["pgd5"]
    if loss == "main":
        assert "pgd5" in rows and "aux loss" not in rows and "by_loss" not in entry
        assert "auxiliary heads" not in run.stdout
        return
    for row in ("pgd5 (worst)", "main loss", "combined loss", "aux loss"):
        assert row in rows, run.stdout
    assert set(entry["by_loss"]) == set(evaluation.ADAPTIVE)
    assert entry["accuracy"] <= min(entry["by_loss"].values())
    assert entry["accuracy"] < entry["by_loss"]["main"]
    assert f"{entry['by_loss']['aux']:.4f}" in rows["aux loss"]
    assert f"{entry['accuracy']:.4f}" in rows["pgd5 (worst)"]
    assert "auxiliary heads" in (tmp_path / "eval.md").read_text()
    # Where the clean loss (val_loss) comes from: the images the head gets wrong.
    head = saved["aux_head"]
    assert "Auxiliary head at the last inserted layer" in run.stdout
    assert 0 <= head["loss_share_aux_wrong"] <= 1 and head["images"] == 100
    assert head["loss_aux_wrong"] > head["loss_aux_right"]
