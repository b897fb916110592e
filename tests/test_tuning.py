"""keras-tuner search: which hyper-parameters each defense exposes, how a trial is built,
and a two-trial search with tune.py on a tiny model and 512 Fashion-MNIST images."""

import json
import os
import subprocess
import sys

import keras
import keras_tuner
import pytest

from again_tf import models, tuning
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("defense, expected", [
    ("pgd_at", ["lr", "weight_decay"]),
    ("trades", ["beta", "lr", "weight_decay"]),
    ("mart", ["beta", "lr", "weight_decay"]),
    ("awp", ["gamma", "lr", "weight_decay"]),
    ("trades_awp", ["beta", "gamma", "lr", "weight_decay"]),
    ("again_pgd", ["ase_alpha", "aux_weight", "lr", "weight_decay"]),
    ("cas_trades", ["beta", "aux_weight", "lr", "weight_decay"]),
])
def test_only_what_the_defense_takes_is_searched(defense, expected):
    assert tuning.tunable(defense) == expected


def classifier():
    return models.build("small_cnn", 10, width=4, hidden=16)


def test_a_trial_routes_the_sampled_values_to_the_defense_and_optimizer():
    hm = tuning.DefenseHyperModel("trades_awp", classifier, (28, 28, 1), eps=0.1, steps=2,
                                  eval_steps=2, optimizer="sgd", fixed={"awp_warmup": 0})
    hp = keras_tuner.HyperParameters()
    hp.Fixed("beta", 3.5)
    hp.Fixed("gamma", 0.004)
    hp.Fixed("lr", 0.05)
    hp.Fixed("weight_decay", 5e-4)
    adv = hm.build(hp)
    assert adv.objective.beta == 3.5 and adv.modifiers[0].gamma == 0.004
    assert adv.modifiers[0].awp_warmup == 0 and adv.weight_decay == 5e-4
    assert isinstance(adv.optimizer, keras.optimizers.SGD)
    assert float(adv.optimizer.learning_rate) == pytest.approx(0.05)
    # The sampled ranges: a fresh space samples inside them.
    space = keras_tuner.HyperParameters()
    hm.build(space)
    assert 1.0 <= space.get("beta") <= 10.0 and 1e-3 <= space.get("gamma") <= 2e-2
    assert 1e-2 <= space.get("lr") <= 0.3


def test_searching_what_the_defense_does_not_take_names_it():
    with pytest.raises(ValueError, match="defense 'pgd_at' takes no beta.*lr, weight_decay"):
        tuning.DefenseHyperModel("pgd_at", classifier, (28, 28, 1), eps=0.1, search=["beta"])
    with pytest.raises(ValueError, match="--eval_steps=0"):
        tuning.DefenseHyperModel("trades", classifier, (28, 28, 1), eps=0.1, eval_steps=0)
    hm = tuning.DefenseHyperModel("trades", classifier, (28, 28, 1), eps=0.1)
    with pytest.raises(ValueError, match="--tuner='grid' is unknown"):
        tuning.make_tuner("grid", hm)


def test_tune_py_two_trials_on_512_images(tmp_path):
    out = tmp_path / "tune"
    proc = subprocess.run(
        [sys.executable, "tune.py", "--defense=trades", "--tuner=bayesian", "--max_trials=2",
         "--search=beta,lr", "--train_size=512", "--val_size=128", "--epochs=1",
         "--attack_steps=2", "--eval_steps=2", "--model=small_cnn", "--width=4",
         "--batch_size=64", f"--out_dir={out}", "--verbose=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2
    assert all(set(r) == {"trial", "beta", "lr", "val_robust_accuracy"} for r in rows)
    assert all(1.0 <= r["beta"] <= 10.0 and 1e-4 <= r["lr"] <= 1e-2 for r in rows)
    assert rows[0]["beta"] != rows[1]["beta"]
    scores = [r["val_robust_accuracy"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("trial"))
    assert table[header].split() == ["trial", "beta", "lr", "val_robust_accuracy"]
    assert len(table) >= header + 4  # header, rule, two trials


def test_tune_py_rejects_a_hyperparameter_the_defense_does_not_take(tmp_path):
    proc = run_main("tune.py", "--defense=awp", "--search=beta", f"--out_dir={tmp_path / 't'}")
    assert proc.returncode != 0
    assert "defense 'awp' takes no beta" in proc.stderr
