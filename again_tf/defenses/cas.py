"""Channel-wise Activation Suppressing (CAS) as a modifier: masks inserted into the classifier."""

import keras

from again_tf.defenses import insertion_points
from again_tf.defenses.base import Modifier
from again_tf.layers import ChannelActivationSuppressing


@keras.saving.register_keras_serializable(package="again_tf")
class CAS(Modifier):
    """Inserts CAS channel masks into the classifier.

    Bai et al., "Improving Adversarial Robustness via Channel-wise Activation
    Suppressing", ICLR 2021. Each point gets a `ChannelActivationSuppressing` layer:
    h ⊙ W[:, y] in training, h ⊙ W[:, argmax aux] at inference; the objective trains
    on CE(main) + β·mean_h CE(aux_h) (β = the objective's `aux_weight`, 2 as in the
    paper and code) and its training attack maximizes the same sum in inference mode
    (as the official attack, run under `model.eval()`). With TRADES/MART the aux
    heads get the objective's own loss terms as well (`cas_trades`, `cas_mart`).

    Default points (`insertion_points.default_points`): for ResNet-18 the post-ReLU
    outputs of both last-stage blocks (`stage4.block0`, `penultimate`), as the
    official code; for WRN the last block's input and the final BN-ReLU map (the
    official WRN places); for the SmallCNN only `penultimate`, its last stage.

    Args:
        points: insertion points (a sequence, or names joined by "+"); None for the
            defaults above.

    Example:
        adv = AdversarialModel(ResNet18(10), defense="cas", eps=8/255, step_size=2/255)
    """

    name = "cas"

    def __init__(self, points=None, **kwargs):
        super().__init__(**kwargs)
        self.points = insertion_points.parse_points(points)

    def inserts(self, model):
        points = insertion_points.resolve(self.name, model, self.points)
        return {p: ChannelActivationSuppressing(model.num_classes,
                                                name=insertion_points.layer_name("cas", p))
                for p in points}

    def get_config(self):
        return {**super().get_config(), "points": self.points}
