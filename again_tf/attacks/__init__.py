"""Adversarial attacks: one module each, sharing `Attack` (base.py)."""

from again_tf.attacks import losses
from again_tf.attacks.base import Attack, project
from again_tf.attacks.pgd import FGSM, PGD
