"""TRADES (Zhang et al., ICML 2019): clean cross-entropy plus β·KL(f(x) ‖ f(x_adv))."""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.defenses.base import Objective
from again_tf.heads import paired_head_loss


def kl_divergence(p_logits, q_logits):
    """KL(softmax(p) ‖ softmax(q)) per example: Σ_k p_k (log p_k − log q_k).

    What `torch.nn.KLDivLoss(log_softmax(q), softmax(p))` sums over classes in the
    TRADES code; gradients flow into both arguments.
    """
    log_p = tf.nn.log_softmax(tf.cast(p_logits, tf.float32), axis=-1)
    log_q = tf.nn.log_softmax(tf.cast(q_logits, tf.float32), axis=-1)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)


def fixed(outputs):
    """`outputs` with every logit tensor wrapped in `stop_gradient` (a constant target)."""
    return {"logits": tf.stop_gradient(outputs["logits"]),
            "aux_logits": [tf.stop_gradient(a) for a in outputs["aux_logits"]]}


@keras.saving.register_keras_serializable(package="again_tf")
class TRADES(Objective):
    """TRADES: CE(f(x), y) + β·KL(f(x) ‖ f(x_adv)), x_adv maximizing the KL. Name: `trades`.

    Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
    ICML 2019. Per example,

        L = CE(f(x), y) + β · Σ_k p_k(x) (log p_k(x) − log p_k(x_adv)),   p = softmax ∘ f,

    with both forward passes differentiated (the official `trades_loss`: `KLDivLoss`
    summed over classes and divided by the batch size, i.e. the batch mean of the
    per-example KL). The clean batch goes through the model once here (the official
    code runs it twice; only BatchNorm's moving statistics could tell). The training
    attack maximizes the same KL with the clean probabilities held fixed, from the start
    x + 0.001·N(0, I) (official `perturb_kl`);
    its ε, step and step count are the `AdversarialModel`'s. Models with auxiliary heads
    get the loss per head: main + `aux_weight` · mean over heads, each head's KL taken
    between its own clean and adversarial outputs (the attack maximizes the same
    combination of KLs).

    Args:
        beta: β, the weight of the KL term. Default 6.0 (`--beta` of the official
            `train_trades_cifar10.py`; the paper's 1/λ = 6 for CIFAR-10).
        aux_weight: weight of the mean auxiliary-head loss. Default 2.0 (see `Objective`).

    Example:
        adv = AdversarialModel(model, defense="trades", beta=6.0, eps=8/255,
                               step_size=0.007, steps=10)
    """

    name = "trades"
    attack_options = {"random_start": "normal", "init_std": 0.001}

    def __init__(self, beta=6.0, aux_weight=2.0, **kwargs):
        super().__init__(aux_weight=aux_weight, **kwargs)
        if float(beta) < 0:
            raise ValueError(f"Expected `beta` >= 0. Received: beta={beta}")
        self.beta = float(beta)

    def attack_loss(self, model, x, y):
        """Per-example KL(f(x) ‖ f(x_adv)) (all heads), the clean outputs held fixed."""
        clean = fixed(self.outputs(model, x, y, training=False))

        def loss_fn(x_adv, labels):
            adversarial = self.outputs(model, x_adv, labels, training=False)
            return paired_head_loss(clean, adversarial, labels,
                                    lambda p, q, _: kl_divergence(p, q), self.aux_weight)
        return loss_fn

    def pair_loss(self, natural_logits, adversarial_logits, labels):
        """CE(f(x), y) + β·KL(f(x) ‖ f(x_adv)) for one head."""
        return (losses.cross_entropy(natural_logits, labels)
                + self.beta * kl_divergence(natural_logits, adversarial_logits))

    def loss(self, model, x, x_adv, y):
        natural = self.outputs(model, x, y, training=True, partner=x_adv)
        adversarial = self.outputs(model, x_adv, y, training=True, partner=x)
        per_example = paired_head_loss(natural, adversarial, y, self.pair_loss, self.aux_weight)
        return per_example, adversarial["logits"]

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}
