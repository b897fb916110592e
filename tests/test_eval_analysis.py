"""Tests of the class-wise report and the gradient-masking sanity checks."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import models
from again_tf.analysis import classwise, sanity


# ----------------------------------------------------------------------------- class-wise
def test_classwise_report_on_hand_made_predictions():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    clean = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    attack = np.array([0, 2, 2, 1, 1, 0, 2, 0, 0, 0])
    rep = classwise.report(y, {"clean": clean, "pgd": attack}, num_classes=3,
                           class_names=["a", "b", "c"])
    assert rep["counts"] == [4, 2, 4]
    assert rep["attacks"]["clean"]["accuracy_per_class"] == [0.75, 1.0, 0.75]
    pgd = rep["attacks"]["pgd"]
    assert pgd["accuracy_per_class"] == [0.25, 0.5, 0.25]
    assert pgd["accuracy"] == pytest.approx(0.3)
    assert pgd["worst_class"] == {"class": 0, "name": "a", "accuracy": 0.25}
    assert pgd["gap"] == pytest.approx(0.25)
    assert pgd["confusion"] == [[1, 1, 2], [1, 1, 0], [3, 0, 1]]
    # Attacked-into counts only examples correct when clean and wrong under attack:
    # class a: two of its clean-correct examples went to c; class c: two went to a.
    assert pgd["attacked_into"] == {"a": [["c", 2]], "b": [["a", 1]], "c": [["a", 2]]}
    assert rep["weight_norms"] is None
    with pytest.raises(ValueError, match="shape"):
        classwise.report(y, {"clean": clean[:5]})


def test_classwise_weight_norms_plots_and_json(tmp_path, trained_cnn, fashion_test):
    x, y = fashion_test
    pred = trained_cnn.predict(x, verbose=0).argmax(1)
    noisy = trained_cnn.predict(np.clip(x + 0.3 * np.sign(np.random.default_rng(0).normal(
        size=x.shape)), 0, 1).astype(np.float32), verbose=0).argmax(1)
    rep = classwise.report(y, {"clean": pred, "noise": noisy}, model=trained_cnn,
                           class_names=[str(i) for i in range(10)])
    kernel = trained_cnn.fc.kernel.numpy()
    np.testing.assert_allclose(rep["weight_norms"], np.sqrt((kernel ** 2).sum(0)), rtol=1e-5)
    acc = np.array(rep["attacks"]["clean"]["accuracy_per_class"])
    r = np.corrcoef(rep["weight_norms"], acc)[0, 1]
    assert rep["weight_norm_correlation"]["clean"] == pytest.approx(r, abs=1e-6)
    paths = classwise.plot(rep, str(tmp_path / "eval"))
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["eval_classwise_accuracy.png", "eval_classwise_confusion_noise.png",
                     "eval_classwise_weight_norms.png"]
    assert len(paths) == 3
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    classwise.save_json(rep, str(tmp_path / "cw.json"))
    assert json.loads((tmp_path / "cw.json").read_text())["counts"] == rep["counts"]
    assert "worst class" in classwise.summary(rep)
    # A plain Keras model: the last Dense layer's columns.
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    np.testing.assert_allclose(classwise.classifier_weight_norms(plain),
                               np.linalg.norm(plain.layers[-1].kernel.numpy(), axis=0))


# ----------------------------------------------------------------------------- sanity
class GradientMasked(keras.Model):
    """Quantizes its input with a zero gradient: PGD cannot move, Square still can."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def call(self, x, training=False):
        quantized = tf.stop_gradient(tf.round(x * 4.0) / 4.0) + 0.0 * x
        return self.inner(quantized, training=training)


FAST = dict(eps_factors=(0.5, 1.0, 2.0), steps_grid=(5, 20), restarts=2, square_queries=300,
            steps=10)


def test_sanity_checks_pass_on_an_honest_model(trained_cnn, fashion_test):
    x, y = fashion_test[0][:100], fashion_test[1][:100]
    rep = sanity.run_checks(trained_cnn, x, y, eps=0.05, surrogate=trained_cnn, **FAST)
    names = [c["name"] for c in rep["checks"]]
    assert names == ["accuracy_falls_with_eps", "large_eps_reaches_zero",
                     "more_steps_or_restarts", "black_box_not_stronger", "transfer_not_stronger"]
    assert rep["failed"] == [] and rep["passed"], sanity.format_report(rep)
    values = rep["checks"][0]["values"]
    assert values["eps"] == [0.025, 0.05, 0.1]
    assert values["accuracy"][0] > values["accuracy"][-1]
    json.dumps(rep)  # serializable as it is


def test_sanity_checks_flag_gradient_masking(trained_cnn, fashion_test):
    x, y = fashion_test[0][:100], fashion_test[1][:100]
    masked = GradientMasked(trained_cnn)
    rep = sanity.run_checks(masked, x, y, eps=0.1, surrogate=trained_cnn, **FAST)
    assert "large_eps_reaches_zero" in rep["failed"], sanity.format_report(rep)
    assert "black_box_not_stronger" in rep["failed"], sanity.format_report(rep)
    assert "transfer_not_stronger" in rep["failed"], sanity.format_report(rep)
    assert not rep["passed"]
    assert "FAILED" in sanity.format_report(rep)


@keras.saving.register_keras_serializable(package="again_tf_tests")
class Scale(keras.layers.Layer):
    """Multiplies the feature map by a learned scalar and emits auxiliary logits."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, h, labels=None, training=None):
        return h * self.scale, tf.reduce_mean(h, axis=(1, 2))[:, :10]


def test_without_inserts_keeps_the_backbone_weights():
    model = models.SmallCNN(10, width=4, hidden=16, inserts={"stage2": Scale()})
    model.build((None, 28, 28, 1))
    x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    backbone = sanity.without_inserts(model, x.shape)
    assert not backbone.inserts
    np.testing.assert_allclose(backbone(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    model.inserts["stage2"].scale.assign(3.0)
    assert not np.allclose(backbone(x).numpy(), model(x).numpy(), atol=1e-4)
    assert sanity.without_inserts(models.SmallCNN(10, width=4, hidden=16), x.shape) is None
