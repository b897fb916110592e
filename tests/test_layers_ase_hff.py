"""Tests of AGAIN's layers (ASE, HFF), the ASE modifier and the again_* defenses."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import layers, models
from again_tf.attacks import losses
from again_tf.defenses import AdversarialModel, registry
from again_tf.defenses.ase import ASE
from again_tf.defenses.base import head_loss
from again_tf.models import forward
from helpers import served_in_fresh_process

N, H, W, C, K = 6, 3, 4, 5, 8  # batch, height, width, channels, classes
LABELS = np.array([3, 0, 7, 1, 5, 2])  # distinct, so y' identifies the partner
TWO_POINTS = "stage1+penultimate"  # two heads on the SmallCNN (its default is one)


def features(seed=0, batch=N):
    # Positive and away from 0, so the mask can be read off as output / input.
    return np.random.default_rng(seed).uniform(0.5, 1.5, (batch, H, W, C)).astype("float32")


def set_head(layer, seed=1):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(C, K)).astype("float32")
    bias = rng.normal(size=(K,)).astype("float32")
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    return kernel, bias


def read_mask(h, out):
    """The per-(example, channel) factor out / h, checked constant over space."""
    ratio = np.asarray(out) / h
    np.testing.assert_allclose(ratio, ratio[:, :1, :1, :].repeat(H, 1).repeat(W, 2),
                               rtol=1e-5, atol=1e-6)
    return ratio[:, 0, 0, :]


def np_mean_std(x, eps=1e-5):
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = x.var(axis=(1, 2), ddof=1, keepdims=True)
    return mean, np.sqrt(var + eps)


def np_hff(content, style, gamma, eps=1e-5):
    """Independent NumPy HFF(content, style) in float64."""
    c, s = content.astype(np.float64), style.astype(np.float64)
    mc, sc = np_mean_std(c, eps)
    ms, ss = np_mean_std(s, eps)
    cs = (c - mc) / sc * ss + ms
    sc_map = (s - ms) / ss * sc + mc
    stats = [np_mean_std(a, eps) for a in (c, s, cs, sc_map)]
    mu = sum(g * m for g, (m, _) in zip(gamma, stats))
    sd = sum(g * d for g, (_, d) in zip(gamma, stats))
    return (c - mc) / sc * sd + mu


# ----------------------------------------------------------------------------- ASE


def test_ase_training_mask_mixes_label_and_permuted_label_columns():
    layer = layers.AttributionSpanEnlargement(K, alpha=0.6, seed=3)
    h = features()
    layer.build(h.shape)
    kernel, bias = set_head(layer)
    out, aux = layer(h, labels=LABELS, training=True)
    np.testing.assert_allclose(aux, h.mean(axis=(1, 2)) @ kernel + bias, rtol=1e-5, atol=1e-5)
    mask = read_mask(h, out)
    partners = []
    for i in range(N):
        candidates = [j for j in range(N) if np.allclose(
            mask[i], 0.6 * kernel[:, LABELS[i]] + 0.4 * kernel[:, LABELS[j]], atol=1e-5)]
        assert len(candidates) == 1, (i, candidates)
        partners.append(candidates[0])
    assert sorted(partners) == list(range(N))  # y' = y[permutation]


def test_ase_permutation_is_fresh_at_every_compiled_call():
    layer = layers.AttributionSpanEnlargement(K, seed=0)
    h = features()
    layer.build(h.shape)
    set_head(layer)
    step = tf.function(lambda x, y: layer(x, labels=y, training=True)[0])
    outs = {np.asarray(step(h, LABELS)).tobytes() for _ in range(6)}
    assert len(outs) > 1


@pytest.mark.parametrize("labels", [None, LABELS])
def test_ase_inference_and_attack_mask_is_the_predicted_class(labels):
    # training=False: the evaluation/export path (no labels) and the training attack
    # (labels given, inference mode) both use W[:, argmax aux], as the official code.
    layer = layers.AttributionSpanEnlargement(K, alpha=0.6)
    h = features(seed=4)
    layer.build(h.shape)
    kernel, bias = set_head(layer, seed=5)
    out, aux = layer(h, labels=labels, training=False)
    logits = h.mean(axis=(1, 2)) @ kernel + bias
    np.testing.assert_allclose(aux, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(read_mask(h, out), kernel[:, logits.argmax(-1)].T, atol=1e-5)


def test_ase_alpha_one_is_the_cas_mask_and_validation():
    layer = layers.AttributionSpanEnlargement(K, alpha=1.0)
    h = features()
    layer.build(h.shape)
    kernel, _ = set_head(layer)
    out, _ = layer(h, labels=LABELS, training=True)
    np.testing.assert_allclose(read_mask(h, out), kernel[:, LABELS].T, atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        layers.AttributionSpanEnlargement(K, alpha=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        layers.AttributionSpanEnlargement(1)


# ----------------------------------------------------------------------------- HFF


def test_hff_fuse_matches_numpy_and_output_has_the_mixed_statistics():
    layer = layers.HybridFeatureFusion()
    c, s = features(seed=6), features(seed=7) * 3.0 - 1.0
    gamma = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    out = np.asarray(layer.fuse(tf.constant(c), tf.constant(s), tf.constant(gamma)))
    np.testing.assert_allclose(out, np_hff(c, s, gamma), rtol=1e-4, atol=1e-5)
    # The output's spatial mean is μ̂ and its (unbiased) std σ̂ up to the ε in σ(c).
    mc, sc = np_mean_std(c)
    ms, ss = np_mean_std(s)
    mixed_mean = (gamma[0] + gamma[3]) * mc + (gamma[1] + gamma[2]) * ms
    mixed_std = (gamma[0] + gamma[3]) * sc + (gamma[1] + gamma[2]) * ss
    np.testing.assert_allclose(out.mean(axis=(1, 2), keepdims=True), mixed_mean, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(1, 2), ddof=1, keepdims=True), mixed_std,
                               rtol=2e-3)


def test_hff_call_pairs_examples_by_a_permutation_and_clean_adv_halves():
    x = features(seed=8)
    gamma = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    shuffle = layers.HybridFeatureFusion(seed=1)
    shuffle.mixing_weights = lambda: tf.constant(gamma)
    out = np.asarray(shuffle(x, training=True))
    partners = []
    for i in range(N):
        found = [j for j in range(N)
                 if np.allclose(out[i], np_hff(x[i:i + 1], x[j:j + 1], gamma)[0], atol=1e-4)]
        partners.append(found[0] if len(found) == 1 else None)
    assert sorted(p for p in partners if p is not None) == list(range(N))
    halves = layers.HybridFeatureFusion(pairing="clean_adv")
    halves.mixing_weights = lambda: tf.constant(gamma)
    swapped = np.concatenate([x[N // 2:], x[:N // 2]])
    np.testing.assert_allclose(halves(x, training=True), np_hff(x, swapped, gamma),
                               rtol=1e-4, atol=1e-4)


def test_hff_is_the_identity_at_inference_and_fresh_in_training():
    layer = layers.HybridFeatureFusion(seed=2)
    x = features(seed=9)
    np.testing.assert_array_equal(layer(x, training=False), x)
    np.testing.assert_array_equal(layer(x, labels=LABELS), x)
    # Paired with itself (what `Objective.outputs` does for an input with no partner),
    # HFF changes nothing either.
    np.testing.assert_allclose(layer.fuse(x, x, layer.mixing_weights()), x, rtol=1e-5, atol=1e-5)
    step = tf.function(lambda a: layer(a, training=True))
    first, second = np.asarray(step(x)), np.asarray(step(x))
    assert not np.allclose(first, second)


def test_hff_mixing_weights_are_dirichlet_1111():
    layer = layers.HybridFeatureFusion(seed=5)
    draws = np.stack([np.asarray(layer.mixing_weights()) for _ in range(600)])
    assert (draws > 0).all()
    np.testing.assert_allclose(draws.sum(axis=1), 1.0, atol=1e-5)
    # Dirichlet(1,1,1,1): each weight ~ Beta(1, 3), mean 1/4, variance 3/80.
    np.testing.assert_allclose(draws.mean(axis=0), 0.25, atol=0.03)
    np.testing.assert_allclose(draws.var(axis=0), 3 / 80, atol=0.01)


def test_hff_argument_errors():
    with pytest.raises(ValueError, match="pairing"):
        layers.HybridFeatureFusion(pairing="halves")
    with pytest.raises(ValueError, match="two spatial"):
        layers.HybridFeatureFusion().build((None, 1, 1, 4))


# ----------------------------------------------------------- model, saving, export


def again_cnn(hff_pairing="shuffle"):
    model = models.SmallCNN(10, width=4, hidden=16, mean=(0.286,), std=(0.353,))
    model.inserts.update(
        ASE(points=TWO_POINTS, hff=True, hff_pairing=hff_pairing).inserts(model))
    model.build((None, 28, 28, 1))
    return model


def test_modifier_default_points_and_hff_placement():
    small = models.SmallCNN(10, width=4, hidden=16)
    inserted = ASE().inserts(small)  # the SmallCNN's last stage only, no HFF by default
    assert list(inserted) == ["penultimate"]
    assert isinstance(inserted["penultimate"], layers.AttributionSpanEnlargement)
    inserted = ASE(hff=True).inserts(small)
    assert [type(l).__name__ for l in inserted["penultimate"].inner] == [
        "HybridFeatureFusion", "AttributionSpanEnlargement"]
    assert inserted["penultimate"].inner[0].pairing == "clean_adv"
    inserted = ASE(points="stage1+penultimate", hff=1).inserts(small)
    assert isinstance(inserted["stage1"], layers.InsertedSequence)  # HFF before the first
    assert isinstance(inserted["penultimate"], layers.AttributionSpanEnlargement)
    assert list(ASE().inserts(models.ResNet18(10))) == ["stage4.block0", "penultimate"]
    assert list(ASE(hff=False).inserts(models.WideResNet(34, 1))) == [
        "stage3.block3", "penultimate"]
    assert list(ASE().inserts(models.WideResNet(10, 1))) == ["penultimate"]
    assert list(ASE(points="penultimate+stage2", hff="false").inserts(small)) == [
        "stage2", "penultimate"]
    with pytest.raises(ValueError, match="stage9"):
        ASE(points="stage9").inserts(small)
    with pytest.raises(ValueError, match="hff_pairing"):
        ASE(hff_pairing="mixed")
    with pytest.raises(ValueError, match="hff"):
        ASE(hff="maybe")


def test_config_round_trip_keras_file_and_saved_model(tmp_path):
    model = again_cnn()
    config = model.inserts["stage1"].get_config()
    clone = layers.InsertedSequence.from_config(config)
    assert [l.get_config()["name"] for l in clone.inner] == [
        l.get_config()["name"] for l in model.inserts["stage1"].inner]
    assert layers.AttributionSpanEnlargement.from_config(
        model.inserts["penultimate"].get_config()).alpha == 0.6
    x = np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype("float32")
    # Train a little so the masks are not at their initial values.
    adv = AdversarialModel(model, defense="pgd_at", eps=0.1, steps=1, eval_steps=0)
    adv.compile(optimizer=keras.optimizers.Adam(1e-2))
    adv.fit(x, np.arange(16) % 10, batch_size=8, epochs=1, verbose=0)
    expected = np.asarray(model(x, training=False))
    path = str(tmp_path / "again.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x, training=False), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served_in_fresh_process(model, x, tmp_path), expected,
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- the again_* names


@pytest.mark.parametrize("name", ["again_pgd", "again_trades", "again_mart", "again_awp"])
def test_again_defenses_train_and_reach_the_aux_heads(name):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(1).uniform(size=(16, 28, 28, 1)).astype("float32")
    y = np.arange(16) % 10
    extra = {"awp_warmup": 0} if name == "again_awp" else {}
    adv = AdversarialModel(models.SmallCNN(10, width=4, hidden=16), defense=name, eps=0.1,
                           steps=2, eval_steps=0, points=TWO_POINTS, hff=True, **extra)
    adv.build((None, 28, 28, 1))
    heads = [adv.model.inserts["stage1"].inner[1], adv.model.inserts["penultimate"]]
    before = [np.asarray(h.kernel).copy() for h in heads]
    adv.compile(optimizer=keras.optimizers.SGD(0.05))
    logs = adv.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][-1])
    for head, old in zip(heads, before):
        assert not np.allclose(np.asarray(head.kernel), old)  # gradient reached W
    aux = forward(adv.model, x, training=False)["aux_logits"]
    assert len(aux) == 2 and all(np.isfinite(np.asarray(a)).all() for a in aux)


def test_training_attack_maximizes_main_plus_aux_cross_entropy():
    keras.utils.set_random_seed(0)
    adv = AdversarialModel(models.SmallCNN(10, width=4, hidden=16), defense="again_pgd",
                           eps=0.1, steps=3, eval_steps=0, points=TWO_POINTS)
    adv.build((None, 28, 28, 1))
    x = np.random.default_rng(2).uniform(size=(8, 28, 28, 1)).astype("float32")
    y = np.arange(8)
    out = forward(adv.model, x, training=False)
    aux = [losses.cross_entropy(a, y) for a in out["aux_logits"]]
    expected = losses.cross_entropy(out["logits"], y) + 2.0 * (aux[0] + aux[1]) / 2
    attack_loss = adv.objective.attack_loss(adv.model, x, y)
    np.testing.assert_allclose(attack_loss(tf.constant(x), y), expected, rtol=1e-5)
    np.testing.assert_allclose(head_loss(out, y, losses.cross_entropy, 2.0), expected, rtol=1e-5)
    # The training attack raises that combined loss.
    x_adv = adv.objective.adversarial_examples(adv.model, adv.attack, tf.constant(x), y)
    assert float(tf.reduce_mean(attack_loss(x_adv, y))) > float(tf.reduce_mean(expected))


def test_clean_adv_pairing_forwards_both_batches_together():
    keras.utils.set_random_seed(0)
    adv = AdversarialModel(models.SmallCNN(10, width=4, hidden=16), defense="again_pgd",
                           eps=0.1, steps=1, eval_steps=0, hff=True, ase_alpha=1.0,
                           points=TWO_POINTS)
    adv.build((None, 28, 28, 1))
    hff = adv.model.inserts["stage1"].inner[0]
    hff.mixing_weights = lambda: tf.constant([0.1, 0.5, 0.3, 0.1])
    x = tf.constant(np.random.default_rng(3).uniform(size=(8, 28, 28, 1)).astype("float32"))
    y = tf.constant(np.arange(8))
    x_adv = adv.objective.adversarial_examples(adv.model, adv.attack, x, y)
    got = adv.objective.outputs(adv.model, x_adv, y, training=True, partner=x)["logits"]
    both = forward(adv.model, tf.concat([x_adv, x], 0), training=True,
                   labels=tf.concat([y, y], 0))["logits"][:8]
    alone = forward(adv.model, x_adv, training=True, labels=y)["logits"]
    np.testing.assert_allclose(got, both, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, alone, atol=1e-3)
    # The defense's loss passes the clean batch as the adversarial one's partner.
    _, logits = adv.objective.loss(adv.model, x, x_adv, y)
    np.testing.assert_allclose(logits, both, rtol=1e-4, atol=1e-4)
    # An input given no partner is paired with itself.
    other = tf.constant(np.random.default_rng(4).uniform(size=(8, 28, 28, 1)).astype("float32"))
    np.testing.assert_allclose(
        adv.objective.outputs(adv.model, other, y, training=True)["logits"],
        forward(adv.model, tf.concat([other, other], 0), training=True,
                labels=tf.concat([y, y], 0))["logits"][:8], rtol=1e-4, atol=1e-4)
    # The clean batch is paired with the adversarial one the other way round.
    got_clean = adv.objective.outputs(adv.model, x, y, training=True, partner=x_adv)["logits"]
    np.testing.assert_allclose(got_clean, forward(
        adv.model, tf.concat([x, x_adv], 0), training=True, labels=tf.concat([y, y], 0))[
        "logits"][:8], rtol=1e-4, atol=1e-4)


def test_again_names_are_registered_with_their_defaults():
    objective, modifiers = registry.get("again_awp")
    assert [type(m).__name__ for m in modifiers] == ["ASE", "AWP"]
    assert (modifiers[1].gamma, modifiers[1].awp_warmup) == (0.005, 9)
    assert modifiers[0].ase_alpha == 0.6 and objective.aux_weight == 2.0
    with pytest.raises(ValueError, match="alpha"):
        registry.get("again_pgd", alpha=0.5)  # it is `ase_alpha`
