"""Adversarial attacks: one module each, sharing `Attack` (base.py)."""

from again_tf.attacks import losses
from again_tf.attacks import geometry
from again_tf.attacks.base import Attack
from again_tf.attacks.geometry import project
from again_tf.attacks.pgd import FGSM, PGD
from again_tf.attacks.early_stopped_pgd import EarlyStoppedPGD
from again_tf.attacks.policy_pgd import PolicyPGD
from again_tf.attacks.apgd import APGD, APGDT
from again_tf.attacks.autoattack import AutoAttack
from again_tf.attacks.cw import CWL2
from again_tf.attacks.fab import FAB
from again_tf.attacks.square import Square
from again_tf.attacks.temperature_pgd import TemperaturePGD
