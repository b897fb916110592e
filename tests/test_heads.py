"""again_tf.analysis.heads: the auxiliary head's accuracy and its agreement with the main
head, against a NumPy forward pass of the inserted mask layers and the head."""

import keras
import numpy as np
import pytest

from again_tf import layers, models
from again_tf.analysis import heads

CLASSES = 3


@pytest.fixture(scope="module")
def masked_cnn():
    """SmallCNN(3, width=4, hidden=8) on 8x8x1 images with CAS layers at stage1 and at the
    penultimate map: two auxiliary heads, each choosing its own mask at inference."""
    keras.utils.set_random_seed(3)
    model = models.SmallCNN(CLASSES, width=4, hidden=8, inserts={
        "stage1": layers.ChannelActivationSuppressing(CLASSES, name="cas_stage1"),
        "penultimate": layers.ChannelActivationSuppressing(CLASSES, name="cas_last")})
    model.build((None, 8, 8, 1))
    rng = np.random.default_rng(0)
    for layer in model.inserts.values():  # spread the masks' values out
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    # Centre each head on other images so that its argmax varies from image to image
    # (at initialization one class wins everywhere).
    calibration, _ = images(seed=5)
    for index, layer in enumerate(model.inserts.values()):
        _, aux = np_forward(model, calibration)
        layer.bias.assign(layer.bias.numpy() - aux[index].mean(0).astype(np.float32))
    return model


def np_cas(h, layer):
    """CAS at inference in NumPy: aux = GAP(h)·W + b, h ⊙ W[:, argmax aux]."""
    w, b = layer.kernel.numpy(), layer.bias.numpy()
    aux = h.mean(axis=(1, 2)) @ w + b
    return h * w[:, np.argmax(aux, -1)].T[:, None, None, :], aux


def np_forward(model, x):
    """(main logits, [aux logits per head]) with the masks and heads done in NumPy; only the
    convolution stages run through Keras."""
    h = model.blocks[0](model.stem(model.normalizer(x)), training=False).numpy()
    h, aux1 = np_cas(h, model.inserts["stage1"])
    h = model.blocks[1](h, training=False).numpy()
    h, aux2 = np_cas(h, model.inserts["penultimate"])
    z = h.reshape(len(h), -1)
    for dense in model.pool.dense:
        z = np.maximum(z @ dense.kernel.numpy() + dense.bias.numpy(), 0.0)
    return z @ model.fc.kernel.numpy() + model.fc.bias.numpy(), [aux1, aux2]


def images(n=96, seed=1):
    """Random images of random brightness, and random labels."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, 8, 8, 1)) * rng.uniform(0.2, 1.0, size=(n, 1, 1, 1))
    return x.astype(np.float32), rng.integers(0, CLASSES, n)


def test_head_report_matches_numpy_on_the_last_head(masked_cnn):
    x, y = images()
    x_adv = np.clip(x + np.random.default_rng(2).uniform(-0.3, 0.3, x.shape), 0, 1).astype(
        np.float32)
    main, aux = np_forward(masked_cnn, x)
    main_adv, aux_adv = np_forward(masked_cnn, x_adv)
    p_main, p_aux = main.argmax(-1), aux[-1].argmax(-1)
    p_main_adv, p_aux_adv = main_adv.argmax(-1), aux_adv[-1].argmax(-1)
    expected = {"aux_clean": np.mean(p_aux == y), "main_clean": np.mean(p_main == y),
                "agree_clean": np.mean(p_aux == p_main), "aux_adv": np.mean(p_aux_adv == y),
                "main_adv": np.mean(p_main_adv == y),
                "agree_adv": np.mean(p_aux_adv == p_main_adv)}
    # The fixture separates what a wrong implementation would mix up: the two heads, the
    # head and the model, agreement and accuracy, clean and attacked images.
    assert np.mean(aux[0].argmax(-1) == y) != expected["aux_clean"]
    assert 0 < expected["agree_clean"] < 1 and 0 < expected["agree_adv"] < 1
    assert len({round(v, 6) for v in expected.values()}) >= 5, expected

    rep = heads.head_report(masked_cnn, x, y, x_adv, batch_size=40)  # 3 uneven batches
    for key, value in expected.items():
        assert rep[key] == pytest.approx(value, abs=1e-9), (key, rep[key], value)
    assert rep["heads"] == 2 and rep["head"] == 1 and rep["images"] == len(y)
    np.testing.assert_array_equal(rep["aux_correct_adv"], p_aux_adv == y)
    np.testing.assert_array_equal(rep["agree_adv_each"], p_aux_adv == p_main_adv)
    # The main head is the model's own inference output.
    np.testing.assert_array_equal(masked_cnn.predict(x, verbose=0).argmax(-1), p_main)

    # The clean cross-entropy split by whether the head is right (Keras' val_loss).
    probs = np.exp(main) / np.exp(main).sum(-1, keepdims=True)
    ce = -np.log(probs[np.arange(len(y)), y])
    wrong = p_aux != y
    assert 0 < wrong.mean() < 1
    assert rep["loss_clean"] == pytest.approx(ce.mean(), rel=1e-5)
    assert rep["loss_aux_wrong"] == pytest.approx(ce[wrong].mean(), rel=1e-5)
    assert rep["loss_aux_right"] == pytest.approx(ce[~wrong].mean(), rel=1e-5)
    assert rep["loss_share_aux_wrong"] == pytest.approx(ce[wrong].sum() / ce.sum(), rel=1e-5)
    assert rep["main_clean_aux_wrong"] == pytest.approx(np.mean(p_main[wrong] == y[wrong]))
    assert rep["main_clean_aux_right"] == pytest.approx(np.mean(p_main[~wrong] == y[~wrong]))

    first = heads.head_report(masked_cnn, x, y, head=0)
    assert first["aux_clean"] == pytest.approx(np.mean(aux[0].argmax(-1) == y))
    assert first["agree_clean"] == pytest.approx(np.mean(aux[0].argmax(-1) == p_main))
    assert "aux_adv" not in first


def test_head_report_rejects_bad_input(masked_cnn):
    x, y = images(8)
    plain = models.SmallCNN(CLASSES, width=2, hidden=4)
    plain.build((None, 8, 8, 1))
    with pytest.raises(ValueError, match="no auxiliary heads|has none"):
        heads.head_report(plain, x, y)
    with pytest.raises(ValueError, match="x_adv"):
        heads.head_report(masked_cnn, x, y, x[:4])
    with pytest.raises(ValueError, match="head"):
        heads.head_report(masked_cnn, x, y, head=2)
    with pytest.raises(ValueError, match="y.shape"):
        heads.head_report(masked_cnn, x, y[:5])
