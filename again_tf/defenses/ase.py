"""AGAIN's feature layers as a modifier: ASE masks, and HFF before the first of them."""

import keras

from again_tf.attacks.pgd import STARTS
from again_tf.defenses import insertion_points
from again_tf.defenses.base import Modifier
from again_tf.layers import AttributionSpanEnlargement, HybridFeatureFusion, InsertedSequence
from again_tf.layers.hybrid_feature_fusion import PAIRINGS


def as_bool(value, arg):
    """True/False from a bool, 0/1 or "true"/"false" (as `--defense_params` gives them)."""
    if isinstance(value, str):
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
    elif value in (0, 1):
        return bool(value)
    raise ValueError(f"Expected `{arg}` true or false (or 1/0). Received: {arg}={value!r}")


@keras.saving.register_keras_serializable(package="again_tf")
class ASE(Modifier):
    """Inserts AGAIN's attribution-span-enlargement masks (and HFF) into the classifier.

    Yin et al., "AGAIN: Adversarial Training with Attribution Span Enlargement and
    Hybrid Feature Fusion", CVPR 2023. At each point an
    `AttributionSpanEnlargement` layer masks the channels with
    α·W[:, y] + (1 − α)·W[:, y'] in training and W[:, argmax aux] at inference; its
    auxiliary logits join the objective's loss, CE(main) + β·mean_h CE(aux_h) with
    β = the objective's `aux_weight` (2, as the official code), and the training
    attack maximizes the same sum in inference mode. With `hff`, a
    `HybridFeatureFusion` runs just before the first ASE mask (training only).

    Default points (`insertion_points.default_points`): the last block's input and the
    penultimate map. The official WRN-34-10 code puts ASE inside the last block of the
    last stage (on its activated input) and on the final BN-ReLU map; for ResNet-18 the
    same two places are the outputs of the two last-stage blocks (`stage4.block0`,
    `penultimate`), the places CAS uses in ResNet-18 — AGAIN's code is CAS's code
    modified; for the SmallCNN only `penultimate` (the map after `stage2`), its last
    stage: a mask after `stage1` makes the model follow that stage's weak auxiliary
    head at inference (see `insertion_points`).

    Args:
        points: insertion points (a sequence, or names joined by "+"); None for the
            defaults above.
        ase_alpha: α of ASE. Default 0.6 (official code).
        hff: insert HFF before the first ASE mask. Default False: the official code
            defines HFF but never calls it, and in 2-epoch Fashion-MNIST runs here HFF
            gave no robustness gain (in-batch pairs cost 12 points of clean accuracy).
            `hff=True` gives the paper's full AGAIN (ASE + HFF).
        hff_pairing: HFF's style partner: "clean_adv" (default; the clean and the
            adversarial features of the same image, forwarded as one batch by the
            objective) or "shuffle" (a random example of the same batch). See
            `HybridFeatureFusion` for the reasons.
        attack_start: the training attack's random start, or None (default) to keep the
            objective's own (uniform in the ε-ball for PGD-AT, as the CAS code AGAIN's
            ResNet recipe follows; x + 0.001·N(0, I) for TRADES and MART). "normal" is
            the official AGAIN code's start, x + 0.001·N(0, I) (`perturb_input` in
            AGAIN_with_AWP/train_awp_again_cifar.py; the `again_awp` recipe sets it);
            "uniform" and "none" are PGD's other starts. It is applied to the
            `AdversarialModel`'s PGD attack when `fit` starts (`make_callbacks`, the hook
            that sees the model), before the training step is traced.

    Example:
        adv = AdversarialModel(SmallCNN(10), defense="again_pgd", ase_alpha=0.6, hff=True)
        # PGD-AT + ASE + HFF (clean/adversarial pairs), ASE at the last map
    """

    name = "ase"

    # The official AGAIN attack's start: x + 0.001·N(0, I).
    NORMAL_START_STD = 0.001

    def __init__(self, points=None, ase_alpha=0.6, hff=False, hff_pairing="clean_adv",
                 attack_start=None, **kwargs):
        super().__init__(**kwargs)
        if attack_start not in (None,) + STARTS:
            raise ValueError(f"Expected `attack_start` None or one of {STARTS}. "
                             f"Received: attack_start={attack_start!r}")
        self.attack_start = attack_start
        self.points = insertion_points.parse_points(points)
        if not 0.0 <= float(ase_alpha) <= 1.0:
            raise ValueError(f"Expected `ase_alpha` in [0, 1]. Received: ase_alpha={ase_alpha}")
        if hff_pairing not in PAIRINGS:
            raise ValueError(f"Expected `hff_pairing` in {PAIRINGS}. "
                             f"Received: hff_pairing={hff_pairing!r}")
        self.ase_alpha = float(ase_alpha)
        self.hff = as_bool(hff, "hff")
        self.hff_pairing = hff_pairing

    def inserts(self, model):
        points = insertion_points.resolve(self.name, model, self.points)
        layers = {}
        for i, point in enumerate(points):
            layer = AttributionSpanEnlargement(
                model.num_classes, alpha=self.ase_alpha,
                name=insertion_points.layer_name("ase", point))
            if self.hff and i == 0:
                fusion = HybridFeatureFusion(pairing=self.hff_pairing,
                                             name=insertion_points.layer_name("hff", point))
                layer = InsertedSequence([fusion, layer],
                                         name=insertion_points.layer_name("hff_ase", point))
            layers[point] = layer
        return layers

    def configure_attack(self, attack):
        """Sets `attack_start` on the training attack (a PGD); nothing if it is None."""
        if self.attack_start is None:
            return
        if not hasattr(attack, "random_start"):
            raise ValueError(f"`attack_start` sets the start of a PGD training attack; the "
                             f"defense's attack is a {type(attack).__name__}")
        attack.random_start = self.attack_start
        if self.attack_start == "normal":
            attack.init_std = self.NORMAL_START_STD

    def make_callbacks(self, adv_model, validation_data):
        self.configure_attack(adv_model.attack)
        return []

    def get_config(self):
        return {**super().get_config(), "points": self.points, "ase_alpha": self.ase_alpha,
                "hff": self.hff, "hff_pairing": self.hff_pairing,
                "attack_start": self.attack_start}
