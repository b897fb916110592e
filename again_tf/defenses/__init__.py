"""Defenses: an objective (what to train on, which loss) composed with modifiers."""

from again_tf.defenses.adversarial_model import AdversarialModel, EpochCallback
from again_tf.defenses.ase import ASE
from again_tf.defenses.awp import AWP
from again_tf.defenses.base import Modifier, Objective, head_loss
from again_tf.defenses.bat import BAT
from again_tf.defenses.cas import CAS
from again_tf.defenses.cifs import CIFS
from again_tf.defenses.classwise import ClasswiseWeights, tune_logit_offset
from again_tf.defenses.fat import FAT, FATTRADES
from again_tf.defenses.las_at import LASAT, StrategyNet
from again_tf.defenses.lbgat import LBGAT
from again_tf.defenses.mart import MART
from again_tf.defenses.pgd_at import PGDAT
from again_tf.defenses.registry import defaults, get, names, register
from again_tf.defenses.standard import Standard
from again_tf.defenses.trades import TRADES
# FAT's and LAS-AT's attacks live in again_tf.attacks; importable from here too, as before.
from again_tf.attacks.early_stopped_pgd import EarlyStoppedPGD  # noqa: E402
from again_tf.attacks.policy_pgd import PolicyPGD  # noqa: E402
