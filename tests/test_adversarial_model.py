"""AdversarialModel: the exact update of a train step, weight decay, sample weights,
validation metrics, saving and loading every defense (real robustness on Fashion-MNIST and
MirroredStrategy: tests/test_defenses.py and tests/test_distribution.py)."""


import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import defenses, evaluation, models
from again_tf.attacks import PGD
from again_tf.defenses import AdversarialModel


def tiny_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.Flatten(), keras.layers.Dense(3)])


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, n)


def one_step(adv, x, y, sw=None):
    adv.compile(optimizer=keras.optimizers.SGD(0.5))
    adv.attack.random_start = "none"  # deterministic, to compare with a manual step
    adv.fit(x, y, sample_weight=sw, batch_size=len(x), epochs=1, verbose=0, shuffle=False)


def manual_step(net, x_train, y, lr=0.5, wd=0.0, sw=None):
    """w ← w − lr·(∇ mean_i sw_i·CE(f(x_i), y_i) + wd·w)."""
    variables = net.trainable_variables
    with tf.GradientTape() as tape:
        per = keras.losses.sparse_categorical_crossentropy(y, net(x_train), from_logits=True)
        loss = tf.reduce_mean(per if sw is None else per * sw)
    grads = tape.gradient(loss, variables)
    return [v.numpy() - lr * (g.numpy() + wd * v.numpy()) for v, g in zip(variables, grads)]


@pytest.mark.parametrize("defense", ["none", "pgd_at"])
def test_train_step_is_one_sgd_step_on_the_defense_loss(defense):
    x, y = batch()
    reference = tiny_net()
    x_train = x
    if defense == "pgd_at":
        x_train = PGD(reference, eps=0.1, step_size=0.03, steps=4, random_start=False)(x, y)
        assert np.abs(x_train.numpy() - x).max() > 0.05
    expected = manual_step(reference, x_train, y)
    adv = AdversarialModel(tiny_net(), defense=defense, eps=0.1, step_size=0.03, steps=4)
    one_step(adv, x, y)
    for e, v in zip(expected, adv.model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)


def test_weight_decay_is_coupled_l2_and_sample_weights_weight_the_mean():
    x, y = batch()
    sw = np.linspace(0.0, 2.0, len(x)).astype(np.float32)
    expected = manual_step(tiny_net(), x, y, wd=0.1, sw=sw)
    adv = AdversarialModel(tiny_net(), defense="none", weight_decay=0.1)
    one_step(adv, x, y, sw)
    for e, v in zip(expected, adv.model.trainable_variables):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-4, atol=1e-6)


def test_validation_logs_robust_accuracy(trained_cnn, fashion_test):
    adv = AdversarialModel(trained_cnn, defense="pgd_at", eps=0.1, eval_steps=10)
    adv.compile(optimizer="adam")
    logs = adv.evaluate(*fashion_test, batch_size=250, return_dict=True, verbose=0)
    assert set(logs) == {"loss", "accuracy", "robust_accuracy"}
    direct = evaluation.evaluate(trained_cnn, *fashion_test, ["clean"], eps=0.1)["clean"]
    assert logs["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-6)
    assert logs["robust_accuracy"] < logs["accuracy"] - 0.3


def test_names_and_bad_hyperparameters():
    assert {"none", "pgd_at"} <= set(defenses.names())
    with pytest.raises(ValueError, match="Unknown defense 'bogus'.*pgd_at"):
        AdversarialModel(tiny_net(), defense="bogus")
    with pytest.raises(ValueError, match="takes no hyper-parameter"):
        AdversarialModel(tiny_net(), defense="pgd_at", gamma=3.0)
    assert defenses.registry.accepts("again_awp", "gamma")
    assert defenses.registry.accepts("again_awp", "ase_alpha")
    assert not defenses.registry.accepts("pgd_at", "gamma")
    # The defense owns the loss: a Keras loss or metric would be silently unused.
    adv = AdversarialModel(tiny_net(), defense="trades")
    with pytest.raises(ValueError, match=r"loss, metrics would not be used.*'trades'"):
        adv.compile(optimizer="adam", loss="mse", metrics=["accuracy"])
    adv.compile(optimizer="adam", jit_compile=False)


def test_xla_train_and_test_steps_trace_once():
    x, y = batch(48)
    adv = AdversarialModel(tiny_net(), defense="pgd_at", eps=0.1, steps=2, eval_steps=2)
    adv.compile(optimizer="adam", jit_compile=True)
    traces = []
    train_step, test_step = adv.train_step, adv.test_step
    # Python runs once per trace.
    adv.train_step = lambda data: traces.append("train") or train_step(data)
    adv.test_step = lambda data: traces.append("test") or test_step(data)
    adv.fit(x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x, y))
    # Once each: `fit` builds the model and optimizer before the first trace (a
    # tf.function whose first trace creates variables is traced twice).
    assert sorted(traces) == ["test", "train"]
    w = [v.numpy() for v in adv.model.trainable_variables]
    adv.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y))
    assert sorted(traces) == ["test", "train"]
    assert any(not np.allclose(a, v.numpy()) for a, v in zip(w, adv.model.trainable_variables))


# One attack step, no validation attack (fewer traces: this test runs for every defense).
SAVE_SETTINGS = dict(eps=0.1, steps=1, eval_steps=0, seed=5)
# Every registry name, and two compositions: AGAIN's full method (ASE + HFF) and a defense
# built from objects with its own hyper-parameters.
SAVED = {name: (lambda net, name=name: AdversarialModel(net, defense=name, **SAVE_SETTINGS,
                                                        **SAVE_PARAMS.get(name, {})))
         for name in defenses.names()}
SAVE_PARAMS = {"bat": {"memorization_scores": np.linspace(-0.2, 0.6, 16)},
               "las_at": {"strategy": "small_cnn"}}  # its policy network, small here
SAVED["again_pgd_hff"] = lambda net: AdversarialModel(net, defense="again_pgd", ase_alpha=0.5,
                                                      hff=1, **SAVE_SETTINGS)
SAVED["trades_cas_awp_objects"] = lambda net: AdversarialModel(
    net, defense=defenses.TRADES(beta=1.0, aux_weight=3.0),
    modifiers=[defenses.CAS(), defenses.AWP(gamma=0.003)], **SAVE_SETTINGS)


# Compiled on both sides of the save (first fit, then the loaded model's next step): the
# headline defense, a composition of objects, the periodic two-function step (LAS-AT) and
# per-example state (BAT). The other names run eagerly here (a trace less each): what this
# test checks is the state that is saved and comes back; their compiled steps run elsewhere:
# none/pgd_at/trades/mart in test_defenses_beat_standard_training, fat/lbgat/las_at in
# test_checkpoint_holds_the_defense_state, fat_trades/mart_awp/classwise_trades through
# train.py, awp/trades_awp on mirrored replicas (test_distribution) and trades_awp under mixed
# precision, again_* with HFF in test_again_defenses_train_and_reach_the_aux_heads, cas/
# cas_trades/cas_mart/cifs in test_layers_cas_cifs, classwise in
# test_epoch_end_update_uses_held_out_pgd_error, again_pgd and cas with their default
# points in test_adaptive_eval's trained models.
COMPILED = {"again_pgd", "trades_cas_awp_objects", "las_at", "bat"}


def attack_random_states(adv):
    """The seed generators of the attacks (plain objects: not saved with the model)."""
    return [a.seed_generator for a in (adv.attack, adv.eval_attack) if a is not None]


@pytest.mark.parametrize("name", sorted(SAVED))
@pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly")
def test_a_saved_adversarial_model_loads_back_the_same(name, tmp_path):
    """Every defense, and compositions of objects, come back from a .keras file as they
    were saved: pieces and their hyper-parameters, inserted layers, β of the heads, the
    same predictions, and the same next training step (optimizer state included)."""
    keras.utils.set_random_seed(0)
    adv = SAVED[name](models.build("small_cnn", 10, width=2, hidden=8))
    adv.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(16, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 16)
    # BAT trains on (x, y, index) batches (its memorization scores are per example).
    arrays = (x, y, np.arange(16)) if adv.uses_index else (x, y)

    def data():
        return tf.data.Dataset.from_tensor_slices(arrays).batch(8)

    fit = dict(epochs=1, verbose=0)
    if any(getattr(p, "needs_holdout", False) for p in [adv.objective] + adv.modifiers):
        fit["validation_data"] = (x, y)  # class-wise weights update from held-out data
    eager = name not in COMPILED
    tf.config.run_functions_eagerly(eager)
    try:
        adv.fit(data(), **fit)
    finally:
        tf.config.run_functions_eagerly(False)
    adv.save(tmp_path / "adv.keras")
    back = keras.saving.load_model(tmp_path / "adv.keras")
    assert back.defense_name == adv.defense_name
    for mine, theirs in zip([adv.objective] + adv.modifiers, [back.objective] + back.modifiers,
                            strict=True):
        assert type(theirs) is type(mine) and theirs.get_config() == mine.get_config()
    assert sorted(back.model.inserts) == sorted(adv.model.inserts)
    # β of the heads travels with the classifier: evaluation attacks the trained loss.
    beta = adv.objective.aux_weight if adv.model.inserts else None
    assert back.model.aux_weight == beta
    assert evaluation.trained_aux_weight(back.model) == (beta or 2.0)
    np.testing.assert_allclose(back.model(x, training=False), adv.model(x, training=False),
                               atol=1e-5)
    # Every variable comes back, but random states (a model file does not hold them); the
    # same next step then needs them, and the attacks', copied over.
    for a, b in zip(adv.variables, back.variables, strict=True):
        if a.path.endswith("seed_generator_state"):
            b.assign(a.value)
            continue
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for mine, theirs in zip(attack_random_states(adv), attack_random_states(back), strict=True):
        theirs.state.assign(mine.state.value)
    # The same next step: eagerly, one batch (the next step is what must match); compiled,
    # both batches.
    tf.config.run_functions_eagerly(eager)
    try:
        adv.fit(data().take(1) if eager else data(), **fit)
        back.fit(data().take(1) if eager else data(), **fit)
    finally:
        tf.config.run_functions_eagerly(False)
    for a, b in zip(adv.model.weights, back.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
