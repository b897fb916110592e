"""Channel-wise Importance-based Feature Selection (CIFS) as a modifier."""

import keras
import tensorflow as tf

from again_tf.defenses import insertion_points
from again_tf.defenses.base import Modifier
from again_tf.layers import ChannelImportanceFeatureSelection
from again_tf.models.wide_resnet import WideResNet


@keras.saving.register_keras_serializable(package="again_tf")
class CIFS(Modifier):
    """Inserts CIFS probes and importance masks into the classifier, and scales the loss.

    Yan et al., "CIFS: Improving Adversarial Robustness of CNNs via Channel-wise
    Importance-based Feature Selection", ICML 2021. Each point gets a
    `ChannelImportanceFeatureSelection` layer: the first a non-linear probe (GAP →
    Dense(`probe_hidden`) → Softplus(β=5) → Dense), the others a linear probe (GAP →
    Dense), as the official ResNet-18 (`modes=['nonlinear', 'linear']`) and WRN code.
    The loss is the official `joint_CE_loss`,

        [CE(final) + (β/K)·Σ_k CE(probe_k)] · 3/(β + 1),   β = 2,

    i.e. the objective's `head_loss` with `aux_weight` β, times 3/(β + 1) (applied
    here as a constant example weight; 1 at β = 2). The training attack maximizes the
    same joint loss (the official `attack_loss='Joint'`, `beta_atk=2`) in inference
    mode, where the probes use their own top-1 and top-2 classes.

    Default points (`insertion_points.default_points`): for ResNet-18 the outputs of
    both last-stage blocks (`stage4.block0`, `penultimate`), the official places; for
    WRN the last block's input and the final BN-ReLU map (official: inside the last
    block and after the final BN-ReLU); for the SmallCNN only `penultimate` (with the
    non-linear probe), its last stage.

    Args:
        points: insertion points (a sequence, or names joined by "+"); None for the
            defaults above.
        probe_hidden: hidden width of the first, non-linear probe. Default None: 240
            for a `WideResNet` (official WRN code), 128 otherwise (official ResNet-18).
        mask_scale: factor on the channel softmax. Default 1 (paper; the current official
            WRN and ResNet-18 code; two old commits of the ResNet-18 code multiplied by 2).

    Example:
        adv = AdversarialModel(ResNet18(10), defense="cifs", eps=8/255, step_size=2/255)
    """

    name = "cifs"

    def __init__(self, points=None, probe_hidden=None, mask_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.points = insertion_points.parse_points(points)
        if probe_hidden is not None and (int(probe_hidden) != probe_hidden or probe_hidden < 1):
            raise ValueError(f"Expected `probe_hidden` None or an integer >= 1. "
                             f"Received: probe_hidden={probe_hidden}")
        if float(mask_scale) <= 0:
            raise ValueError(f"Expected `mask_scale` > 0. Received: mask_scale={mask_scale}")
        self.probe_hidden = None if probe_hidden is None else int(probe_hidden)
        self.mask_scale = float(mask_scale)

    def inserts(self, model):
        points = insertion_points.resolve(self.name, model, self.points)
        hidden = self.probe_hidden or (240 if isinstance(model, WideResNet) else 128)
        return {p: ChannelImportanceFeatureSelection(
                    model.num_classes, hidden_units=hidden if i == 0 else None,
                    mask_scale=self.mask_scale, name=insertion_points.layer_name("cifs", p))
                for i, p in enumerate(points)}

    def example_weights(self, adv_model, x, x_adv, y):
        """The joint loss's constant factor 3/(β + 1), β = the objective's aux_weight."""
        beta = adv_model.objective.aux_weight
        return tf.fill(tf.shape(y)[:1], 3.0 / (beta + 1.0))

    def get_config(self):
        return {**super().get_config(), "points": self.points,
                "probe_hidden": self.probe_hidden, "mask_scale": self.mask_scale}
