"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training."""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.defenses.base import Objective
from again_tf.heads import paired_head_loss

# The constants of the official `mart_loss`: log(1.0001 − max_{k≠y} p_k + 1e-12),
# KL against log(p_adv + 1e-12), and the weight (1.0000001 − p_y(x)).
MARGIN_OFFSET = 1.0001
LOG_FLOOR = 1e-12
WEIGHT_OFFSET = 1.0000001


def mart_pair_loss(natural_logits, adversarial_logits, labels, beta):
    """MART's per-example loss for one head; see `MART`."""
    natural_logits = tf.cast(natural_logits, tf.float32)
    adversarial_logits = tf.cast(adversarial_logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    p_adv = tf.nn.softmax(adversarial_logits, axis=-1)
    is_label = tf.one_hot(labels, tf.shape(p_adv)[-1], on_value=True, off_value=False)
    runner_up = tf.reduce_max(tf.where(is_label, -1.0, p_adv), axis=-1)
    boosted_ce = (losses.cross_entropy(adversarial_logits, labels)
                  - tf.math.log(MARGIN_OFFSET - runner_up + LOG_FLOOR))
    p_nat = tf.nn.softmax(natural_logits, axis=-1)
    log_p_nat = tf.nn.log_softmax(natural_logits, axis=-1)
    kl = tf.reduce_sum(p_nat * (log_p_nat - tf.math.log(p_adv + LOG_FLOOR)), axis=-1)
    p_true = tf.reduce_sum(tf.where(is_label, p_nat, 0.0), axis=-1)
    return boosted_ce + beta * kl * (WEIGHT_OFFSET - p_true)


@keras.saving.register_keras_serializable(package="again_tf")
class MART(Objective):
    """MART: boosted CE on x_adv + β·KL(f(x) ‖ f(x_adv))·(1 − p_y(x)). Name: `mart`.

    Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified
    Examples", ICLR 2020. Per example, with p = softmax ∘ f,

        L = CE(f(x_adv), y) − log(1.0001 − max_{k≠y} p_k(x_adv))
            + β · KL(p(x) ‖ p(x_adv)) · (1 − p_y(x)),

    as the official `mart_loss` computes it: the KL is `KLDivLoss(log(p_adv + 1e-12),
    p_nat)` summed over classes, i.e. KL(p_nat ‖ p_adv); nothing is detached, so the
    gradient reaches the model through p_nat, p_adv and the weight (1.0000001 − p_y(x))
    alike. The training attack is PGD on CE(f(x_adv), y) started at x + 0.001·N(0, I)
    (the official code's start; the paper just says PGD), with the `AdversarialModel`'s
    ε, step and step count. Auxiliary heads get the same loss per head (main +
    `aux_weight` · mean over heads); the attack maximizes their combined CE.

    Args:
        beta: β. Default 6.0 (the official `mart_loss` and `train_wideresnet.py`; the
            official `train_resnet.py` uses 5.0 for ResNet-18, see the flagfiles).
        aux_weight: weight of the mean auxiliary-head loss. Default 2.0 (see `Objective`).

    Example:
        adv = AdversarialModel(model, defense="mart", beta=5.0, eps=8/255,
                               step_size=0.007, steps=10)
    """

    name = "mart"
    attack_options = {"random_start": "normal", "init_std": 0.001}

    def __init__(self, beta=6.0, aux_weight=2.0, **kwargs):
        super().__init__(aux_weight=aux_weight, **kwargs)
        if float(beta) < 0:
            raise ValueError(f"Expected `beta` >= 0. Received: beta={beta}")
        self.beta = float(beta)

    def loss(self, model, x, x_adv, y):
        natural = self.outputs(model, x, y, training=True, partner=x_adv)
        adversarial = self.outputs(model, x_adv, y, training=True, partner=x)
        per_example = paired_head_loss(
            natural, adversarial, y, lambda n, a, labels: mart_pair_loss(n, a, labels, self.beta),
            self.aux_weight)
        return per_example, adversarial["logits"]

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}
