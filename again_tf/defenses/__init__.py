"""Defenses: an objective (what to train on, which loss) composed with modifiers."""

from again_tf.defenses.adversarial_model import AdversarialModel
from again_tf.defenses.base import Modifier, Objective, head_loss
from again_tf.defenses.pgd_at import PGDAT
from again_tf.defenses.registry import get, names, register
from again_tf.defenses.standard import Standard
