"""PGD adversarial training (Madry et al., ICLR 2018)."""

import keras

from again_tf.attacks import losses
from again_tf.defenses.base import Objective
from again_tf.heads import head_loss


@keras.saving.register_keras_serializable(package="again_tf")
class PGDAT(Objective):
    """PGD adversarial training: CE(f(x_adv), y), x_adv from PGD on CE. Name: `pgd_at`.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
    ICLR 2018: min_θ E max_{‖δ‖∞ ≤ ε} CE(f_θ(x + δ), y), the inner maximization by
    PGD with a uniform random start. Recipe defaults (ε=8/255, α=2/255, 10 steps for
    CIFAR-10) live in the flagfiles and `AdversarialModel`'s arguments.
    """

    name = "pgd_at"

    def loss(self, model, x, x_adv, y):
        outputs = self.outputs(model, x_adv, y, training=True, partner=x)
        return head_loss(outputs, y, losses.cross_entropy, self.aux_weight), outputs["logits"]
