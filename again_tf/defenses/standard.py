"""Standard training, the `none` defense."""

import keras

from again_tf.attacks import losses
from again_tf.defenses.base import Objective
from again_tf.heads import head_loss


@keras.saving.register_keras_serializable(package="again_tf")
class Standard(Objective):
    """Standard (non-adversarial) training: CE(f(x), y) on the clean batch. Name: `none`."""

    name = "none"
    uses_attack = False

    def loss(self, model, x, x_adv, y):
        outputs = self.outputs(model, x, y, training=True)
        return head_loss(outputs, y, losses.cross_entropy, self.aux_weight), outputs["logits"]
