"""The official code's forms (issue 16): each against an independent NumPy computation or
a property the official code has and ours lacked before.

Square's L2 query with per-channel window norms and unrelated seeds per draw; C&W-L2's
abort-early check starting from +inf; AutoAttack's zero-gradient warning; CAS's
1%-of-max channel frequency; BAT's discrimination loss as the paper writes it; AGAIN's
x + 0.001·N(0, I) training-attack start; the recipes of the AWP repository (BatchNorm in
train mode during the attack) and MART's WRN defaults.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import data, models, training
from again_tf.analysis import channels
from again_tf.attacks import AutoAttack, Square
from again_tf.attacks.cw import CWL2
from again_tf.attacks.square import eta, fold
from again_tf.defenses import AdversarialModel
from again_tf.defenses.bat import discrimination_loss
from helpers import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear_model(shape, kernel, bias, activation=None):
    """Flatten → Dense with the given weights: logits we can compute in NumPy."""
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                              keras.layers.Dense(kernel.shape[1], activation=activation)])
    model.layers[-1].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model


# ----------------------------------------------------------------------------- Square
def np_square_l2_update(x, x_best, vh, vw, vh2, vw2, s, pattern, signs, eps):
    """fra31/auto-attack's L2 query (square.py), NHWC: window norms per (example, channel)."""
    delta = x_best - x
    c = x.shape[-1]
    win1 = delta[:, vh:vh + s, vw:vw + s, :]
    norm_win1 = np.sqrt((win1 ** 2).sum(axis=(1, 2)))                       # (n, c)
    mask = np.zeros(x.shape[1:3])
    mask[vh:vh + s, vw:vw + s] = 1.0
    mask[vh2:vh2 + s, vw2:vw2 + s] = 1.0
    norm_windows = np.sqrt(((delta * mask[None, :, :, None]) ** 2).sum(axis=(1, 2)))  # (n, c)
    norm_image = np.sqrt((delta ** 2).sum(axis=(1, 2, 3)))                  # (n,)
    new = pattern[None, :, :, None] * signs[:, None, None, :]
    new = new + win1 / (1e-12 + norm_win1[:, None, None, :])
    scale = np.sqrt(np.maximum(eps ** 2 - norm_image ** 2, 0.0)[:, None] / c + norm_windows ** 2)
    new = new / (1e-12 + np.sqrt((new ** 2).sum(axis=(1, 2))))[:, None, None, :]
    new = new * scale[:, None, None, :]
    out = delta.copy()
    out[:, vh2:vh2 + s, vw2:vw2 + s, :] = 0.0
    out[:, vh:vh + s, vw:vw + s, :] = new
    length = np.sqrt((out ** 2).sum(axis=(1, 2, 3)))[:, None, None, None]
    return np.clip(x + eps * out / (length + 1e-12), 0.0, 1.0)


def test_square_l2_query_uses_per_channel_window_norms():
    rng = np.random.default_rng(0)
    n, h, w, c, s, eps = 3, 12, 12, 3, 5, 0.5
    x = rng.uniform(0.2, 0.8, (n, h, w, c))
    # Channels perturbed at different scales: per-channel and all-channel norms differ.
    x_best = x + rng.normal(size=(n, h, w, c)) * np.array([0.002, 0.01, 0.03])
    pattern = eta(s, tf.constant([3, 4])).numpy().astype(np.float64)
    signs = rng.choice([-1.0, 1.0], size=(n, c))
    attack = Square(linear_model((h, w, c), np.zeros((h * w * c, 4)), np.zeros(4)),
                    eps=eps, norm="l2")
    for vh, vw, vh2, vw2 in [(2, 3, 6, 1), (4, 4, 5, 6), (0, 7, 0, 7)]:
        got = attack.l2_update(tf.constant(x, tf.float32), tf.constant(x_best, tf.float32),
                               vh, vw, vh2, vw2, s, tf.constant(pattern, tf.float32),
                               tf.constant(signs[:, None, None, :], tf.float32)).numpy()
        want = np_square_l2_update(x, x_best, vh, vw, vh2, vw2, s, pattern, signs, eps)
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_square_draws_never_share_a_seed():
    # Every seed Square derives (restart r, query i, draw k) must be different; the additive
    # fold made query i's column seed equal query i+1's row seed, and shifted restarts.
    base = tf.constant([12345, 678], tf.int32)
    seen = {}
    for r in range(3):
        run = fold(base, r)
        seen[("init", r)] = tuple(fold(run, 0).numpy())
        for i in range(40):
            query = fold(run, 10, i)
            for k in range(1, 7):
                seen[(r, i, k)] = tuple(fold(query, k).numpy())
    assert len(set(seen.values())) == len(seen)


# ----------------------------------------------------------------------------- C&W-L2
def test_cwl2_does_not_abort_when_the_first_loss_exceeds_1e6():
    # With c = 1e7 the summed loss starts above 1e6; the official check compares it with
    # +inf (prev = np.inf), so the search runs; prev = 1e6 aborted it at iteration 0.
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(16, 3)) * 3.0
    model = linear_model((4, 4, 1), kernel, np.zeros(3))
    x = rng.uniform(0.3, 0.7, (6, 4, 4, 1)).astype(np.float32)
    y = np.asarray(model(x)).argmax(1)
    logits = x.reshape(6, -1) @ kernel
    margin = logits[np.arange(6), y] - np.where(np.eye(3, dtype=bool)[y], -np.inf, logits).max(1)
    assert (1e7 * margin).sum() > 1e6
    attack = CWL2(model, initial_const=1e7, binary_search_steps=1, max_iterations=200)
    x_adv = attack(x, y).numpy()
    fooled = np.asarray(model(x_adv)).argmax(1) != y
    assert fooled.all()
    assert np.abs(x_adv - x).max() > 0


# ----------------------------------------------------------------------------- AutoAttack
def test_autoattack_warns_about_zero_gradients_like_the_official_check():
    # A ReLU layer that is dead on dark images (all logits 0: no gradient at all) and fully
    # active on bright ones; dark images are labelled 0 (argmax of equal logits).
    rng = np.random.default_rng(2)
    h, w, eps = 6, 6, 0.03
    kernel = rng.uniform(0.5, 1.5, (h * w, 4)) / (h * w)
    bias = np.full(4, -0.5)
    dark = rng.uniform(0.0, 0.2, (7, h, w, 1))
    bright = rng.uniform(0.75, 1.0, (9, h, w, 1))
    x = np.concatenate([dark, bright]).astype(np.float32)[rng.permutation(16)]
    pre = x.reshape(16, -1) @ kernel + bias
    reach = eps * np.abs(kernel).sum(0)  # how far the ε-ball can move each pre-activation
    dead = (pre + reach < 0).all(1)
    alive = (pre - reach > 0).all(1)
    assert (dead | alive).all() and dead.sum() == 7
    y = np.where(dead, 0, np.maximum(pre, 0).argmax(1))
    model = linear_model((h, w, 1), kernel, bias, activation="relu")
    aa = AutoAttack(model, eps=eps, attacks=["apgd-ce", "apgd-t"], n_iter=5)
    result = aa.run(x, y, batch_size=8)
    assert result["clean_accuracy"] == 1.0
    # Only the DLR components are checked (as the official code); every dark point, once.
    assert result["zero_gradients"] == {"apgd-t": int(dead.sum())}
    robust_before = int(round(result["accuracy_after"]["apgd-ce"] * 16))
    warning = [m for m in result["warnings"] if m.startswith("APGD-T")]
    assert len(warning) == 1 and f"{int(dead.sum())} of the {robust_before} points" in warning[0]


# ----------------------------------------------------------------------------- CAS
def np_active_frequency(acts, y, num_classes, threshold):
    """CAS's freq_dis_resnet18_base.py: active when above threshold x the example's max."""
    freq = np.zeros((num_classes, acts.shape[1]))
    for k in range(num_classes):
        rows = acts[y == k]
        if len(rows) == 0:
            continue
        for row in rows:
            freq[k] += row > threshold * row.max()
        freq[k] /= len(rows)
    return freq


def test_active_frequency_is_the_official_one_percent_of_max_rule():
    rng = np.random.default_rng(3)
    acts = rng.exponential(size=(60, 16)) ** 3  # heavy-tailed: many channels below 1 %
    acts[::7, 5] = 0.0
    y = rng.integers(0, 4, 60)
    y[y == 2] = 1  # class 2 empty: a row of zeros
    for threshold in (0.01, 0.2):
        got = channels.active_frequency(acts, y, 4, threshold)
        np.testing.assert_allclose(got, np_active_frequency(acts, y, 4, threshold))
    assert 0 < got.sum() < 60 and not got[2].any()
    # Strictly above the relative threshold, per example (not per batch).
    hand = np.array([[1.0, 0.01, 0.011, 0.0], [100.0, 2.0, 0.5, 1.0]])
    np.testing.assert_allclose(channels.active_frequency(hand, [0, 1], 2),
                               [[1, 0, 1, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="threshold"):
        channels.active_frequency(acts, y, 4, threshold=1.5)


def test_channel_analysis_script_offers_the_official_frequency(tmp_path):
    keras.utils.set_random_seed(5)
    model = models.SmallCNN(10, width=4, hidden=8, mean=(0.286,), std=(0.353,))
    model(np.zeros((1, 28, 28, 1), np.float32))
    model.save(tmp_path / "m.keras")
    out = tmp_path / "out"
    proc = run_main(os.path.join("benchmarks", "channel_analysis.py"),
                    f"--model_path={tmp_path / 'm.keras'}", "--num_images=30", "--steps=1",
                    "--frequency=active", "--active_threshold=0.05", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "channels.json").read_text())
    assert report["frequency"] == "active" and report["active_threshold"] == 0.05
    x, y = data.load_arrays("fashion_mnist", "test[:30]")
    acts = channels.channel_activations(model, x.astype(np.float32) / 255.0)
    np.testing.assert_allclose(report["frequency_natural"],
                               np_active_frequency(acts, y.astype(int), 10, 0.05), atol=1e-12)


# ----------------------------------------------------------------------------- BAT
def np_paper_discrimination_loss(h, y, typical, tau):
    """BAT's L_DL as the paper writes it: raw h·h/τ, only negatives in the denominator."""
    losses = []
    for i in np.flatnonzero(typical):
        pos = [j for j in np.flatnonzero(typical) if j != i and y[j] == y[i]]
        neg = [b for b in np.flatnonzero(typical) if y[b] != y[i]]
        if not pos or not neg:
            continue
        denominator = sum(np.exp(h[i] @ h[b] / tau) for b in neg)
        losses.append(np.mean([-np.log(np.exp(h[i] @ h[j] / tau) / denominator) for j in pos]))
    return float(np.mean(losses)) if losses else 0.0


def test_bat_paper_discrimination_loss_has_only_negatives_and_raw_features():
    rng = np.random.default_rng(4)
    h = rng.normal(size=(12, 6)).astype(np.float32) * 0.7
    y = np.array([0, 0, 1, 1, 1, 2, 2, 0, 2, 1, 0, 2])
    typical = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1], bool)
    for tau in (0.5, 2.0):
        got = float(discrimination_loss(h, y, typical, tau, normalize=False,
                                        include_positive=False))
        want = np_paper_discrimination_loss(h.astype(np.float64), y, typical, tau)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # Unbounded below on raw features (the docstring's reason for our default): features
    # whose positives beat their negatives push it down without limit as they grow.
    centers = np.eye(3, 6)[y] * 2.0
    tight = (centers + rng.normal(size=(12, 6)) * 0.05).astype(np.float32)
    paper = [float(discrimination_loss(c * tight, y, typical, 1.0, False, False))
             for c in (1.0, 3.0, 9.0)]
    ours = [float(discrimination_loss(c * tight, y, typical, 1.0)) for c in (1.0, 3.0, 9.0)]
    assert paper[0] > paper[1] > paper[2] and paper[2] < -100
    assert min(ours) >= 0.0


# ----------------------------------------------------------------------------- AGAIN
def test_again_attack_start_option_gives_the_official_normal_start():
    keras.utils.set_random_seed(0)
    net = models.SmallCNN(10, width=4, hidden=8)
    adv = AdversarialModel(net, defense="again_pgd", eps=0.1, attack_start="normal", seed=3)
    assert adv.attack.random_start == "uniform"  # set when fit starts (its callbacks)
    adv.callbacks()
    assert adv.attack.random_start == "normal" and adv.attack.init_std == 0.001
    x = np.full((64, 28, 28, 1), 0.5, np.float32)
    noise = adv.attack.start(tf.constant(x)).numpy() - x
    assert abs(noise.std() - 0.001) < 5e-5 and abs(noise.mean()) < 5e-5
    ase = adv.modifiers[0]
    assert type(ase).from_config(ase.get_config()).attack_start == "normal"
    # Without the option each objective keeps its own start (TRADES: normal, PGD-AT: uniform).
    plain = AdversarialModel(models.SmallCNN(10, width=4, hidden=8), defense="again_pgd",
                             eps=0.1)
    plain.callbacks()
    assert plain.attack.random_start == "uniform"
    with pytest.raises(ValueError, match="attack_start"):
        AdversarialModel(models.SmallCNN(10, width=4, hidden=8), defense="again_awp",
                         attack_start="gaussian")


# ----------------------------------------------------------------------------- recipes
def read_flagfile(name):
    flags = {}
    with open(os.path.join(ROOT, "flags", name)) as f:
        for line in f:
            line = line.strip()
            if line.startswith("--"):
                key, _, value = line[2:].partition("=")
                flags[key] = value if _ else "true"
    return flags


def test_awp_repository_recipes_attack_in_train_mode_and_mart_wrn_is_official():
    at_awp = ("cifar10_preact_resnet18_awp.cfg", "cifar10_wrn34_10_awp.cfg",
              "cifar10_resnet18_pgd_at.cfg")
    for name in at_awp:
        assert read_flagfile(name).get("attack_training") == "true", name
        assert read_flagfile(name).get("attack_updates_statistics") == "true", name
    # TRADES-AWP and every other official code attack in eval mode.
    others = [n for n in os.listdir(os.path.join(ROOT, "flags"))
              if n.startswith("cifar10_") and n.endswith(".cfg") and n not in at_awp]
    assert "cifar10_wrn34_10_trades_awp.cfg" in others
    assert not any("attack_training" in read_flagfile(n)
                   or "attack_updates_statistics" in read_flagfile(n) for n in others)
    mart = read_flagfile("cifar10_wrn34_10_mart.cfg")  # YisenWang/MART train_wideresnet.py
    assert (mart["epochs"], mart["weight_decay"], mart["lr_milestones"]) == ("90", "7e-4",
                                                                             "74,89")
    assert read_flagfile("cifar10_wrn34_10_again_awp.cfg")["defense_params"] == \
        "attack_start=normal"


def test_train_config_attack_training_reaches_the_attack():
    small = dict(defense="pgd_at", model="small_cnn", width=4)
    cfg, info = training.resolve(training.TrainConfig(attack_training=True, **small))
    adv = training.build(cfg, info)
    assert adv.attack_training and adv.attack.training
    assert AdversarialModel.from_config(adv.get_config()).attack_training
    default, _ = training.resolve(training.TrainConfig(**small))
    assert not training.build(default, data.info("fashion_mnist")).attack.training


def batchnorm_model(momentum):
    """Flatten → BatchNorm → Dense: one forward pass's effect on the moving mean and
    variance can be computed in NumPy."""
    return keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                             keras.layers.BatchNormalization(momentum=momentum),
                             keras.layers.Dense(3)])


@pytest.mark.parametrize("update", [False, True])
def test_train_mode_attack_updates_statistics_only_when_asked(update):
    from again_tf.attacks import PGD
    momentum = 0.9
    model = batchnorm_model(momentum)
    bn = model.layers[1]
    x = np.random.default_rng(0).uniform(size=(16, 4, 4, 1)).astype(np.float32)
    y = np.arange(16) % 3
    before_mean, before_var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    # One step from no random start: exactly one training-mode forward pass, on x itself.
    attack = PGD(model, 0.1, 0.05, 1, random_start="none", training=True,
                 update_statistics=update)
    attack(x, y)
    flat = x.reshape(16, -1).astype(np.float64)
    if update:  # PyTorch's train-mode attack: the pass at x moves the statistics
        want_mean = momentum * before_mean + (1 - momentum) * flat.mean(0)
        want_var = momentum * before_var + (1 - momentum) * flat.var(0)
    else:
        want_mean, want_var = before_mean, before_var
    np.testing.assert_allclose(bn.moving_mean.numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), want_var, rtol=1e-4, atol=1e-6)


def test_attack_updates_statistics_needs_the_train_mode_attack():
    from again_tf.attacks import PGD
    with pytest.raises(ValueError, match="training=True"):
        PGD(batchnorm_model(0.9), 0.1, 0.05, 1, update_statistics=True)
    with pytest.raises(ValueError, match="--attack_updates_statistics needs --attack_training"):
        training.validate(training.TrainConfig(defense="pgd_at", model="small_cnn", width=4,
                                               attack_updates_statistics=True))
    small = dict(defense="pgd_at", model="small_cnn", width=4, attack_training=True)
    cfg, info = training.resolve(training.TrainConfig(attack_updates_statistics=True, **small))
    adv = training.build(cfg, info)
    assert adv.attack.training and adv.attack.update_statistics
    assert AdversarialModel.from_config(adv.get_config()).attack.update_statistics
