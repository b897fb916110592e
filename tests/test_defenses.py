"""The defenses: TRADES, MART, LBGAT and LAS-AT losses against NumPy, AWP's exact weight
update, FAT's early stopping and τ schedule, LAS-AT's attack and policy step, the
registry, checkpoints, train.py, and real robustness on Fashion-MNIST."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import evaluation, models
from again_tf.attacks import PGD, EarlyStoppedPGD, PolicyPGD
from helpers import load_script, run_main
from again_tf.defenses import (AWP, FAT, FATTRADES, LASAT, LBGAT, MART, TRADES,
                               AdversarialModel, Standard, registry)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("none", "pgd_at", "trades", "mart", "awp", "trades_awp", "mart_awp", "fat",
         "fat_trades", "lbgat", "las_at")

# ---------------------------------------------------------------- NumPy references


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_kl(p_logits, q_logits):
    p = np.exp(np_log_softmax(p_logits))
    return (p * (np.log(p) - np.log(np.exp(np_log_softmax(q_logits))))).sum(-1)


def np_trades(nat, adv, y, beta):
    return np_ce(nat, y) + beta * np_kl(nat, adv)


def np_mart(nat, adv, y, beta):
    p_adv = np.exp(np_log_softmax(adv))
    p_nat = np.exp(np_log_softmax(nat))
    others = p_adv.copy()
    others[np.arange(len(y)), y] = -1.0
    boosted = np_ce(adv, y) - np.log(1.0001 - others.max(-1) + 1e-12)
    kl = (p_nat * (np.log(p_nat) - np.log(p_adv + 1e-12))).sum(-1)
    return boosted + beta * kl * (1.0000001 - p_nat[np.arange(len(y)), y])


def np_lbgat(nat, adv, teacher, y, beta):
    return ((adv - teacher) ** 2).mean(-1) + np_ce(teacher, y) + beta * np_kl(nat, adv)


def numeric_grad(f, z, h=1e-3):
    """Central differences of the scalar f at z (float64)."""
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        e = np.zeros_like(z)
        e[idx] = h
        g[idx] = (f(z + e) - f(z - e)) / (2 * h)
    return g


# Fixed logits: 5 examples, 4 classes, with a confident one and a misclassified one.
RNG = np.random.default_rng(0)
NAT = RNG.normal(size=(5, 4)) * 2.0
ADV = NAT + RNG.normal(size=(5, 4)) * 1.5
NAT[0] = [8.0, -2.0, 0.0, 1.0]
ADV[1] = [-1.0, 3.0, 0.5, 0.0]
LABELS = np.array([0, 0, 2, 3, 1])


def identity_model(classes=4):
    """A Keras model whose logits are its input: the objectives' losses become functions
    of the logits we feed in."""
    return keras.Sequential([keras.Input((classes,)), keras.layers.Identity()])


def objective_loss(objective, nat, adv, y):
    per, logits = objective.loss(identity_model(nat.shape[1]), tf.constant(nat, tf.float32),
                                 tf.constant(adv, tf.float32), tf.constant(y))
    return per.numpy().astype(np.float64), logits.numpy()


@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_loss_matches_numpy(beta):
    per, logits = objective_loss(TRADES(beta=beta), NAT, ADV, LABELS)
    np.testing.assert_allclose(per, np_trades(NAT, ADV, LABELS, beta), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, ADV, rtol=1e-6)  # accuracy is logged on x_adv


@pytest.mark.parametrize("beta", [5.0, 6.0])
def test_mart_loss_matches_numpy(beta):
    per, _ = objective_loss(MART(beta=beta), NAT, ADV, LABELS)
    np.testing.assert_allclose(per, np_mart(NAT, ADV, LABELS, beta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective,reference", [
    (TRADES(beta=6.0), lambda n, a: np_trades(n, a, LABELS, 6.0).mean()),
    (MART(beta=6.0), lambda n, a: np_mart(n, a, LABELS, 6.0).mean()),
])
def test_gradients_flow_through_both_forward_passes(objective, reference):
    """Nothing is detached: the gradient w.r.t. the clean and the adversarial logits is
    the derivative of the NumPy formula (TRADES' and MART's official losses)."""
    nat, adv = tf.Variable(NAT, dtype=tf.float32), tf.Variable(ADV, dtype=tf.float32)
    with tf.GradientTape() as tape:
        per, _ = objective.loss(identity_model(), nat, adv, tf.constant(LABELS))
        loss = tf.reduce_mean(per)
    g_nat, g_adv = tape.gradient(loss, [nat, adv])
    np.testing.assert_allclose(g_nat, numeric_grad(lambda z: reference(z, ADV), NAT),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(g_adv, numeric_grad(lambda z: reference(NAT, z), ADV),
                               rtol=1e-3, atol=1e-4)
    assert np.abs(g_nat).max() > 1e-2 and np.abs(g_adv).max() > 1e-2


def split_outputs(objective, classes=4):
    """Makes `objective.outputs` read [main logits | aux logits] from a (batch, 2K) input."""
    def outputs(model, x, y, training, partner=None):
        return {"logits": x[:, :classes], "aux_logits": [x[:, classes:]], "features": None}
    objective.outputs = outputs
    return objective


def test_auxiliary_heads_get_the_loss_per_head():
    aux_nat, aux_adv = NAT[::-1].copy(), ADV * 0.5
    x = np.concatenate([NAT, aux_nat], 1)
    x_adv = np.concatenate([ADV, aux_adv], 1)
    for objective, ref in [(TRADES(beta=6.0, aux_weight=2.0), np_trades),
                           (MART(beta=5.0, aux_weight=2.0), np_mart)]:
        objective = split_outputs(objective)
        per, _ = objective_loss(objective, x, x_adv, LABELS)
        beta = objective.beta
        expected = ref(NAT, ADV, LABELS, beta) + 2.0 * ref(aux_nat, aux_adv, LABELS, beta)
        np.testing.assert_allclose(per, expected, rtol=1e-5, atol=1e-5)
    # TRADES' attack maximizes the KL of every head, the clean side held fixed.
    trades = split_outputs(TRADES(aux_weight=2.0))
    attack_loss = trades.attack_loss(None, tf.constant(x, tf.float32), tf.constant(LABELS))
    value = attack_loss(tf.constant(x_adv, tf.float32), tf.constant(LABELS)).numpy()
    np.testing.assert_allclose(value, np_kl(NAT, ADV) + 2.0 * np_kl(aux_nat, aux_adv),
                               rtol=1e-5, atol=1e-6)


def test_lbgat_loss_matches_numpy_and_trains_the_teacher():
    teacher_logits = RNG.normal(size=(5, 4)) * 2.0
    objective = LBGAT(beta=6.0)
    # Student logits are the first 4 inputs; the teacher reads the last 4.
    objective.outputs = lambda model, x, y, training, partner=None: {
        "logits": x[:, :4], "aux_logits": [], "features": None}
    objective.teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    kernel = np.concatenate([np.zeros((4, 4)), np.eye(4)]).astype(np.float32)
    objective.teacher.set_weights([kernel, np.zeros(4, np.float32)])
    x = np.concatenate([NAT, teacher_logits], 1)
    x_adv = np.concatenate([ADV, teacher_logits], 1)
    per, _ = objective_loss(objective, x, x_adv, LABELS)
    np.testing.assert_allclose(per, np_lbgat(NAT, ADV, teacher_logits, LABELS, 6.0),
                               rtol=1e-5, atol=1e-5)
    # The teacher gets the gradient of the MSE and its CE.
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(objective.loss(None, tf.constant(x, tf.float32),
                                             tf.constant(x_adv, tf.float32),
                                             tf.constant(LABELS))[0])
    g_bias = tape.gradient(loss, objective.teacher.trainable_variables[1]).numpy()
    expected = numeric_grad(
        lambda t: np_lbgat(NAT, ADV, t, LABELS, 6.0).mean(), teacher_logits).sum(0)
    np.testing.assert_allclose(g_bias, expected, rtol=1e-3, atol=1e-4)


def test_las_at_label_smoothed_loss_matches_numpy():
    objective = LASAT(label_factor=0.7)
    per, _ = objective_loss(objective, NAT, ADV, LABELS)
    target = np.full((5, 4), 0.3 / 3)
    target[np.arange(5), LABELS] = 0.7
    np.testing.assert_allclose(per, -(target * np_log_softmax(ADV)).sum(-1), rtol=1e-5)


# ---------------------------------------------------------------- AWP


def bn_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(3)])


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, n)


def awp_step(lr, gamma=0.05, warmup=0, epochs=1):
    x, y = batch()
    adv = AdversarialModel(bn_net(), defense=Standard(),
                           modifiers=[AWP(gamma=gamma, awp_warmup=warmup)], eval_steps=0)
    adv.compile(optimizer=keras.optimizers.SGD(lr))
    adv.fit(x, y, batch_size=len(x), epochs=epochs, verbose=0, shuffle=False)
    return adv


def ce_grads(net, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            y, net(x, training=True), from_logits=True))
    return [g.numpy() for g in tape.gradient(loss, net.trainable_variables)]


def set_trainable(net, values):
    for var, value in zip(net.trainable_variables, values):
        var.assign(value)
    return net


def test_awp_removes_the_perturbation_exactly():
    """With a zero learning rate the weights come back bit for bit after the step."""
    start = bn_net()
    adv = awp_step(lr=0.0)
    assert float(adv.modifiers[0].gamma) > 0
    for before, after in zip(start.trainable_variables, adv.model.trainable_variables):
        np.testing.assert_array_equal(before.numpy(), after.numpy())


def test_awp_takes_the_gradient_at_the_perturbed_weights():
    """w_new = w − lr·∇L(w + v), v = γ‖w‖·d/‖d‖ per rank-≥2 tensor, d = η·∇L(w)."""
    x, y = batch()
    gamma, lr = 0.05, 0.5
    reference = bn_net()
    w = [v.numpy() for v in reference.trainable_variables]
    g0 = ce_grads(reference, x, y)
    v = [gamma * np.linalg.norm(wi) / np.linalg.norm(0.01 * gi) * 0.01 * gi if wi.ndim >= 2
         else np.zeros_like(wi) for wi, gi in zip(w, g0)]
    assert sum(vi.ndim >= 2 for vi in v) == 2  # conv and dense kernels; not biases or BN
    perturbed = set_trainable(bn_net(), [wi + vi for wi, vi in zip(w, v)])
    g1 = ce_grads(perturbed, x, y)
    expected = [wi - lr * gi for wi, gi in zip(w, g1)]
    at_w = [wi - lr * gi for wi, gi in zip(w, g0)]

    adv = awp_step(lr=lr, gamma=gamma)
    got = [v.numpy() for v in adv.model.trainable_variables]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    # ... which is measurably not the step at the unperturbed weights.
    assert max(np.abs(a - g).max() for a, g in zip(at_w, got)) > 1e-3
    # The BN statistics are those of one training pass at w + v (AWP's ascent pass
    # does not leak into them).
    perturbed_bn = set_trainable(bn_net(), [wi + vi for wi, vi in zip(w, v)])
    perturbed_bn(x, training=True)
    np.testing.assert_allclose(adv.model.layers[1].moving_mean.numpy(),
                               perturbed_bn.layers[1].moving_mean.numpy(), rtol=1e-5, atol=1e-7)


def test_awp_warmup_follows_the_epoch():
    x, y = batch()
    plain = AdversarialModel(bn_net(), defense="none", eval_steps=0)
    plain.compile(optimizer=keras.optimizers.SGD(0.5))
    plain.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    warm = awp_step(lr=0.5, warmup=1)  # epoch 0 is a warm-up epoch: a plain step
    for a, b in zip(plain.model.trainable_variables, warm.model.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert int(warm.modifiers[0].epoch.numpy()) == 0
    later = awp_step(lr=0.5, warmup=1, epochs=2)
    assert int(later.modifiers[0].epoch.numpy()) == 1  # set by AdversarialModel.fit


def deterministic(adv):
    adv.attack.random_start = "none"
    return adv


def test_trades_plus_awp_modifier_is_trades_awp():
    """Composition: defense="trades" + modifiers=[AWP(...)] is the `trades_awp` name."""
    x, y = batch()
    results = []
    for kwargs in [dict(defense="trades", modifiers=[AWP(gamma=0.005, proxy_lr=0.1)]),
                   dict(defense="trades_awp", awp_warmup=0)]:
        adv = deterministic(AdversarialModel(bn_net(), eps=0.1, step_size=0.03, steps=2,
                                             eval_steps=0, **kwargs))
        adv.compile(optimizer=keras.optimizers.SGD(0.5))
        adv.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
        results.append([v.numpy() for v in adv.model.trainable_variables])
        assert adv.modifiers[0].gamma == 0.005
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    plain = deterministic(AdversarialModel(bn_net(), defense="trades", eps=0.1,
                                           step_size=0.03, steps=2, eval_steps=0))
    plain.compile(optimizer=keras.optimizers.SGD(0.5))
    plain.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    assert max(np.abs(a - b.numpy()).max()
               for a, b in zip(results[0], plain.model.trainable_variables)) > 1e-4


# ---------------------------------------------------------------- FAT


def linear_net(seed=3, classes=5):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(classes)])


@pytest.mark.parametrize("tau", [0, 2])
def test_early_stopped_pgd_stops_each_example_after_tau_more_misclassified_steps(tau):
    """The early-stopped iterate of each example is plain PGD's iterate s_i, s_i being the
    step at which it was found misclassified for the (τ+1)-th time (K if never)."""
    net = linear_net()
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.8, size=(64, 4, 4, 1)).astype(np.float32)
    y = np.argmax(net(x).numpy(), -1)  # all start correctly classified ...
    y[:8] = (y[:8] + 1) % 5  # ... but these 8
    steps, settings = 8, dict(eps=0.06, step_size=0.01, random_start="none")
    iterates = [x] + [PGD(net, steps=k, **settings)(x, y).numpy() for k in range(1, steps + 1)]
    wrong = np.stack([np.argmax(net(it).numpy(), -1) != y for it in iterates[:steps]])
    count = np.cumsum(wrong, 0)
    stop = np.array([np.argmax(count[:, i] == tau + 1) if count[-1, i] > tau else steps
                     for i in range(len(y))])
    expected = np.stack([iterates[s][i] for i, s in enumerate(stop)])
    got = EarlyStoppedPGD(net, steps=steps, tau=tau, **settings)(x, y).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Both kinds are present: examples frozen early, and examples that never stop.
    assert (stop < steps).sum() >= 8 and (stop == steps).sum() >= 4, stop
    if tau:
        first = np.array([np.argmax(wrong[:, i]) for i in range(len(y))])
        frozen = stop < steps
        assert (stop[frozen] >= first[frozen] + tau).all()
        assert (np.abs(got - x).reshape(len(y), -1).max(1)[:8] > 0).any()
    else:
        np.testing.assert_array_equal(got[:8], x[:8])  # wrong at the start: not moved


def test_fat_tau_schedules_are_the_official_ones():
    for objective, table in [(FAT(), {0: 0, 49: 0, 50: 1, 89: 1, 90: 2, 119: 2}),
                             (FATTRADES(), {29: 0, 30: 1, 49: 1, 50: 2, 69: 2, 70: 3})]:
        for epoch, tau in table.items():  # 0-based epochs; the official code's are 1-based
            objective.set_epoch(epoch)
            assert int(objective.current_tau()) == tau, (objective.name, epoch)
    assert FAT(tau=1, tau_milestones="").tau_milestones == ()
    assert FAT(tau_milestones="3:1").tau_milestones == (1, 3)
    with pytest.raises(ValueError, match="tau_milestones"):
        FAT(tau_milestones="a:b")


# ---------------------------------------------------------------- LAS-AT


def two_class_net():
    """A linear 2-class model whose input gradient has a constant sign per pixel."""
    net = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=16)
    w1 = w0 + np.sign(rng.normal(size=16)) * rng.uniform(0.2, 1.0, 16)
    net.set_weights([np.stack([w0, w1], 1).astype(np.float32), np.zeros(2, np.float32)])
    return net, np.sign(w1 - w0).reshape(4, 4, 1)


def test_policy_pgd_uses_each_examples_eps_step_and_step_count():
    net, direction = two_class_net()
    x = np.full((6, 4, 4, 1), 0.5, np.float32)
    y = np.array([0, 0, 0, 1, 1, 1])
    eps = np.array([0.02, 0.05, 0.2, 0.02, 0.05, 0.2], np.float32)
    alpha = np.array([0.01, 0.01, 0.02, 0.005, 0.03, 0.01], np.float32)
    steps = np.array([3, 1, 4, 13, 2, 5], np.int32)
    attack = PolicyPGD(net, eps=1e-7)  # a negligible random start
    got = attack.perturb_policy(x, y, eps, alpha, steps).numpy()
    toward = np.where(y == 0, 1.0, -1.0)[:, None, None, None] * direction
    move = np.minimum(steps * alpha, eps)[:, None, None, None]
    np.testing.assert_allclose(got, x + toward * move, atol=1e-5)


def tiny_las_at(**kwargs):
    keras.utils.set_random_seed(0)
    net = models.SmallCNN(3, width=2, hidden=8)
    adv = AdversarialModel(net, defense="las_at", eps=0.1, eval_steps=0, strategy="small_cnn",
                           **kwargs)
    adv.build((None, 8, 8, 1))
    adv.compile(optimizer=keras.optimizers.SGD(0.1))
    return adv


def test_las_at_policy_step_is_reinforce_every_interval_steps():
    adv = tiny_las_at(interval=3, policy_lr=0.5, clip_norm=1e9)
    objective = adv.objective
    x, y = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype(np.float32), np.arange(8) % 3
    actions = [tf.constant(np.arange(8) % n, tf.int32) for n in objective.strategy.head_sizes]
    objective.sample = lambda logits: actions
    objective.reward = lambda *args: tf.constant(2.0)
    strategy_vars = objective.strategy.trainable_variables
    start = [v.numpy() for v in strategy_vars]
    moving = [v.numpy() for v in objective.strategy.non_trainable_variables]
    for _ in range(2):
        objective.before_attack(adv, tf.constant(x), tf.constant(y))
    for a, v in zip(start, strategy_vars):  # steps 1 and 2: no update
        np.testing.assert_array_equal(a, v.numpy())
    # Manual REINFORCE step: θ ← θ + lr·R·∇ Σ_heads mean_i log π(a_i), strategy in
    # training mode (from the same BatchNorm statistics).
    with tf.GradientTape() as tape:
        logits = objective.strategy(tf.constant(x), training=True)
        log_prob = sum(tf.reduce_mean(tf.gather(tf.nn.log_softmax(l), a, batch_dims=1))
                       for l, a in zip(logits, actions))
    grads = tape.gradient(log_prob, strategy_vars)
    expected = [a + 0.5 * 2.0 * (0 if g is None else g.numpy()) for a, g in zip(start, grads)]
    for v, s in zip(objective.strategy.non_trainable_variables, moving):
        v.assign(s)
    objective.before_attack(adv, tf.constant(x), tf.constant(y))  # step 3: update
    for e, v in zip(expected, strategy_vars):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)
    assert int(objective.step.numpy()) == 3


def test_las_at_reward_leaves_the_target_model_untouched():
    adv = tiny_las_at()
    x, y = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype(np.float32), np.arange(8) % 3
    before = [v.numpy() for v in adv.model.variables]
    actions = adv.objective.sample(adv.objective.strategy(x))
    reward = float(adv.objective.reward(adv, tf.constant(x), tf.constant(y), actions))
    for a, v in zip(before, adv.model.variables):
        np.testing.assert_array_equal(a, v.numpy())
    assert 0.0 < reward <= 10.0 + 4.0 + 2.0


# ---------------------------------------------------------------- names, fit, checkpoints


def test_registry_names_and_defaults():
    assert set(NAMES) <= set(registry.names())
    objective, modifiers = registry.get("trades_awp")
    assert type(objective) is TRADES and objective.beta == 6.0
    assert [(type(m), m.gamma, m.awp_warmup) for m in modifiers] == [(AWP, 0.005, 9)]
    _, modifiers = registry.get("trades_awp", gamma=0.02)
    assert modifiers[0].gamma == 0.02
    assert registry.get("awp")[1][0].gamma == 0.01
    assert registry.get("mart")[0].beta == 6.0 and registry.get("mart", beta=5)[0].beta == 5.0
    with pytest.raises(ValueError, match=r"takes no hyper-parameter\(s\) \['gamma'\]"):
        registry.get("trades", gamma=0.1)
    with pytest.raises(ValueError, match="Unknown teacher='vgg'"):
        registry.get("lbgat", teacher="vgg")


@pytest.mark.parametrize("objective", [
    TRADES(beta=3.0), MART(beta=5.0), FAT(tau=1, tau_milestones=(3, 7), omega=0.0),
    FATTRADES(beta=2.0), LBGAT(beta=0.0, teacher="resnet18"),
    LASAT(strategy="small_cnn", eps_range="2:5", interval=7), AWP(gamma=0.02, awp_warmup=4)])
def test_config_round_trip(objective):
    config = objective.get_config()
    clone = type(objective).from_config(config)
    assert clone.get_config() == config


@pytest.mark.parametrize("name", NAMES)
def test_every_name_trains_with_fit(name):
    """Each name takes real steps through `fit` (eagerly here, for speed; the compiled
    path of every name runs in the other tests: none/pgd_at/trades/mart on Fashion-MNIST,
    trades/trades_awp in the composition test, lbgat/las_at/fat in the checkpoint test,
    fat_trades/mart_awp through train.py, AWP's exact step with the `none` objective)."""
    keras.utils.set_random_seed(0)
    net = models.SmallCNN(3, width=2, hidden=8)
    extra = {"strategy": "small_cnn", "interval": 1} if name == "las_at" else {}
    adv = AdversarialModel(net, defense=name, eps=0.1, steps=2, eval_steps=2, **extra)
    adv.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), run_eagerly=True)
    x, y = batch(8)
    x = np.repeat(np.repeat(x[:, :4, :4], 2, 1), 2, 2)  # 8x8 images
    adv.build((None, 8, 8, 1))
    start = [v.numpy() for v in net.trainable_variables]
    history = adv.fit(x, y, batch_size=8, epochs=1, verbose=0, validation_data=(x, y)).history
    assert np.isfinite(history["loss"]).all() and "val_robust_accuracy" in history
    assert all(np.abs(a - v.numpy()).max() > 0 for a, v in zip(start, net.trainable_variables))


@pytest.mark.parametrize("name,extra", [
    ("lbgat", {}), ("las_at", {"strategy": "small_cnn", "interval": 1}),
    ("fat", {"tau_milestones": "1"})])
def test_checkpoint_holds_the_defense_state(name, extra, tmp_path):
    """The teacher, the strategy net and the epoch schedule are saved and restored."""
    x, y = batch(16)
    x = np.repeat(np.repeat(x[:, :4, :4], 2, 1), 2, 2)

    def make():
        keras.utils.set_random_seed(0)
        adv = AdversarialModel(models.SmallCNN(3, width=2, hidden=8), defense=name, eps=0.1,
                               steps=2, eval_steps=0, weight_decay=0.01, **extra)
        adv.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return adv

    adv = make()
    adv.build((None, 8, 8, 1))
    extra_vars = [v for v in adv.objective.trainable_variables]
    before = [v.numpy() for v in extra_vars]
    adv.fit(x, y, batch_size=8, epochs=2, verbose=0)
    if name == "lbgat":  # the teacher is trained (and decayed) by the same optimizer
        assert adv.objective.teacher is not None and len(extra_vars) == len(net_vars(adv))
        assert all(np.abs(b - v.numpy()).max() > 0 for b, v in zip(before, extra_vars))
    if name == "las_at":
        assert any(np.abs(b - v.numpy()).max() > 0 for b, v in zip(before, extra_vars))
    if name == "fat":
        assert int(adv.objective.epoch.numpy()) == 1 and int(adv.objective.current_tau()) == 1
    path = str(tmp_path / "adv.weights.h5")
    adv.save_weights(path)
    other = make()
    other.build((None, 8, 8, 1))
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    assert len(other.weights) == len(adv.weights)
    for a, b in zip(adv.weights, other.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(other.optimizer.variables) == len(adv.optimizer.variables)
    for a, b in zip(adv.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def net_vars(adv):
    return adv.model.trainable_variables


@pytest.mark.parametrize("name", ["fat_trades", "mart_awp"])
def test_train_py_runs_the_defense(name, tmp_path):
    out = tmp_path / "run"
    run = run_main("train.py", f"--defense={name}", "--epochs=1", "--train_size=512",
                   "--val_size=128", "--test_images=64", "--attack_steps=2", "--eval_steps=2",
                   "--model=small_cnn", "--width=4", f"--out_dir={out}", "--verbose=0")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["defense"] == name and 0.0 <= result["pgd20"] <= result["clean"] <= 1.0
    assert result["test_images"] == 64 and result["epochs"] == 1
    for produced in ("model.keras", "best.keras", "metrics.csv", "checkpoint/last.weights.h5"):
        assert (out / produced).exists(), produced


def test_defenses_beat_standard_training_on_fashion_mnist(fashion_train, fashion_test):
    """PGD-AT, TRADES and MART must really defend: PGD-10 accuracy on 300 test images
    above standard training's after 2 epochs on 3,000 images."""
    x_test, y_test = fashion_test[0][:300], fashion_test[1][:300]
    robust, clean = {}, {}
    for defense in ("none", "pgd_at", "trades", "mart"):
        keras.utils.set_random_seed(1)
        net = models.SmallCNN(width=8, hidden=64, mean=(0.286,), std=(0.353,))
        adv = AdversarialModel(net, defense=defense, eps=0.1, step_size=0.04, steps=3,
                               eval_steps=0)
        adv.compile(optimizer=keras.optimizers.Adam(2e-3))
        adv.fit(*fashion_train, batch_size=64, epochs=2, verbose=0)
        scores = evaluation.evaluate(net, x_test, y_test, ["clean", "pgd10"], eps=0.1)
        robust[defense] = scores["pgd10"]["accuracy"]
        clean[defense] = scores["clean"]["accuracy"]
    # Margins measured over seeds 1-4 (MART: 1-3; tensorflow 2.21, keras 3.15): PGD-10 none
    # <= 0.013, pgd_at >= 0.38, trades >= 0.35, mart >= 0.26; clean none >= 0.79, pgd_at >= 0.70,
    # trades >= 0.66, mart 0.40-0.55 (MART's boosted loss trains slowest on 2 short epochs).
    for defense in ("pgd_at", "trades", "mart"):
        assert robust[defense] > robust["none"] + 0.15, (robust, clean)
        assert clean[defense] > 0.3, (robust, clean)  # 3x chance: a classifier, not a constant
    assert robust["pgd_at"] > robust["none"] + 0.2, (robust, clean)  # the baseline, by more


def test_benchmark_script_keeps_the_table_when_a_defense_fails(tmp_path):
    """benchmarks/defenses.py: a failing defense is reported and left out, not fatal; the
    runs are kept per defense and seed and a rerun skips them; a layer defense gets the
    auxiliary-head columns, a plain one "=" and "—" there."""
    runs = tmp_path / "runs"
    script = [sys.executable, os.path.join("benchmarks", "defenses.py"), "--epochs=1",
              "--train_size=256", "--val_size=64", "--test_images=32", "--attack_steps=1",
              "--model=small_cnn", "--width=4", "--aa_images=16", "--aa_defenses=none",
              f"--out_dir={runs}", f"--json={tmp_path / 't.json'}",
              f"--records_dir={tmp_path / 'records'}"]
    trained = subprocess.run(script + ["--defenses=none,cas"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    for defense in ("none", "cas"):
        assert (runs / defense / "seed0" / "results.json").exists()
    # The reruns in this process (the first run was the script's real command line).
    again = run_main(*script[1:], "--defenses=none")
    assert again.returncode == 0 and "not retrained" in again.stdout, again.stderr[-2000:]
    rebuilt = run_main(*script[1:], "--defenses=none,pgd_at,cas", "--from_runs")
    assert rebuilt.returncode != 0
    assert "pgd_at failed" in rebuilt.stderr and "1 defense(s) failed" in rebuilt.stderr
    table = json.loads((tmp_path / "t.json").read_text())
    assert [r["defense"] for r in table["rows"]] == ["none", "cas"]
    assert "pgd_at" in table["failed"]
    assert "| none |" in rebuilt.stdout
    none, cas = table["rows"]
    # Markdown: defense, seeds, clean, PGD-20, AA, official, main, mask-choice, aux clean,
    # aux PGD-20, agree clean, agree PGD-20, worst class, train s.
    cells = {r["defense"]: [c.strip() for c in line.split("|")[1:-1]]
             for r in table["rows"] for line in rebuilt.stdout.splitlines()
             if line.startswith(f"| {r['defense']} |")}
    assert cells["none"][5:8] == ["="] * 3 and cells["none"][8:12] == ["—"] * 4
    assert cells["cas"][4] == "·" and none["aa"] is not None and cas["aa"] is None
    assert none["aux_heads"] == 0 and cas["aux_heads"] == 1
    for key in ("pgd20_combined", "pgd20_main", "pgd20_mask", "aux_clean", "aux_pgd20",
                "agree_clean", "agree_pgd20"):
        assert 0.0 <= cas[key] <= 1.0 and none[key] is None, key
    # The adaptive PGD-20 is the per-image worst case over its objectives.
    assert cas["pgd20"] <= min(cas["pgd20_main"], cas["pgd20_combined"])
    assert cas["pgd20_all"] <= min(cas["pgd20"], cas["pgd20_mask"])
    assert f"--out_dir={runs / 'cas' / 'seed0'}" in cas["runs"][0]["train_command"]
    assert "--defenses=cas" in cas["command"] and cas["command"] in rebuilt.stdout
    # A fresh clone has the records, not the run folders: the table comes back from them,
    # but only for the same configuration and evaluation settings.
    assert (tmp_path / "records" / "none" / "seed0.json").exists()
    shutil.rmtree(runs / "none")
    recorded = run_main(*script[1:], "--defenses=none,cas", "--from_runs")
    assert recorded.returncode == 0, recorded.stderr[-2000:]
    assert "measurements from" in recorded.stdout
    again_rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["runs"][0]["measured"] for r in again_rows] == [
        r["runs"][0]["measured"] for r in table["rows"]]
    for other in ("--aa_images=8", "--attack_steps=2"):
        mismatch = run_main(*script[1:], "--defenses=none", "--from_runs", other)
        assert mismatch.returncode != 0 and "none failed" in mismatch.stderr, other
        assert ("measured with other settings" if "aa_images" in other
                else "another training configuration") in mismatch.stderr, mismatch.stderr
    # A damaged record fails its row with a line naming the file.
    record = tmp_path / "records" / "none" / "seed0.json"
    for text, reason in (('{"config": ', "is unreadable"), ("[]", "is unreadable"),
                         ('{"config": {}}', "lacks measured, settings")):
        record.write_text(text)
        damaged = run_main(*script[1:], "--defenses=none", "--from_runs")
        assert damaged.returncode != 0, text
        assert f"the record {record} {reason}" in damaged.stderr, damaged.stderr


def test_benchmark_passes_memorization_scores_to_the_rows_that_use_them():
    """bat trains on per-example scores: by default the file `benchmarks/memorization.py
    --train_size=<N>` writes, or --memorization_scores; other rows get none."""
    from absl import flags

    script = load_script(os.path.join("benchmarks", "defenses.py"))
    try:
        flags.FLAGS(["defenses.py", "--train_size=256"])
        bat = script["train_config"]("bat", 0, "runs/bat")
        assert bat.memorization_scores == os.path.join(
            "benchmarks", "fashion_mnist_memorization_256.npy")
        assert "memorization_scores" not in bat.defense_params  # one file, the flag's
        assert (f"--memorization_scores={bat.memorization_scores}"
                in script["train_command"](bat))
        plain = script["train_config"]("pgd_at", 0, "runs/pgd_at")
        assert plain.memorization_scores is None
        assert "--memorization_scores" not in script["train_command"](plain)
        flags.FLAGS(["defenses.py", "--memorization_scores=/data/mem.npy"])
        assert script["train_config"]("bat", 0, "b").memorization_scores == "/data/mem.npy"
        assert ("--memorization_scores=/data/mem.npy"
                in script["row_command"]("bat", "runs", "runs"))
        assert "--memorization_scores" not in script["row_command"]("pgd_at", "runs", "runs")
    finally:
        flags.FLAGS.unparse_flags()
