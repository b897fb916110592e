"""Defense names: each is an objective composed with modifiers and per-name defaults.

`get("trades_awp", beta=6.0, gamma=0.005)` builds the objective and modifiers and hands
each hyper-parameter to the piece whose constructor takes it; a name's own defaults
(e.g. `trades_awp`'s γ = 0.005) apply where the caller gives no value.
"""

import inspect

from again_tf.defenses.ase import ASE
from again_tf.defenses.awp import AWP
from again_tf.defenses.bat import BAT
from again_tf.defenses.cas import CAS
from again_tf.defenses.cifs import CIFS
from again_tf.defenses.classwise import ClasswiseWeights
from again_tf.defenses.fat import FAT, FATTRADES
from again_tf.defenses.las_at import LASAT
from again_tf.defenses.lbgat import LBGAT
from again_tf.defenses.mart import MART
from again_tf.defenses.pgd_at import PGDAT
from again_tf.defenses.standard import Standard
from again_tf.defenses.trades import TRADES

# name -> (objective class, modifier classes, defaults that differ from the classes')
_DEFENSES = {
    "none": (Standard, (), {}),
    "pgd_at": (PGDAT, (), {}),
    "trades": (TRADES, (), {}),
    "mart": (MART, (), {}),
    # AT-AWP: official AT_AWP/train_cifar10.py (γ = 0.01, no warm-up, proxy lr 0.01).
    "awp": (PGDAT, (AWP,), {}),
    # TRADES-AWP: official trades_AWP/train_trades_cifar.py: γ = 0.005, AWP when the
    # 1-based epoch >= 10 (9 epochs without), proxy SGD at the model's lr 0.1.
    "trades_awp": (TRADES, (AWP,), {"gamma": 0.005, "awp_warmup": 9, "proxy_lr": 0.1}),
    # MART-AWP: no official code; the TRADES-AWP perturbation size, no warm-up.
    "mart_awp": (MART, (AWP,), {"gamma": 0.005}),
    "fat": (FAT, (), {}),
    "fat_trades": (FATTRADES, (), {}),
    "lbgat": (LBGAT, (), {}),
    "las_at": (LASAT, (), {}),
}


def register(name, objective, modifiers=(), defaults=None):
    """Adds (or replaces) the defense `name` = `objective` composed with `modifiers`.

    `defaults` (optional) are hyper-parameters this name uses unless the caller gives them.
    """
    _DEFENSES[name] = (objective, tuple(modifiers), dict(defaults or {}))


def names():
    """The registered defense names."""
    return tuple(_DEFENSES)


def defaults(name):
    """The hyper-parameters the defense `name` sets beyond its classes' own defaults."""
    _check(name)
    return dict(_DEFENSES[name][2])


def needs(name, attribute):
    """True if a piece of the defense `name` sets the class attribute `attribute`.

    E.g. `needs("bat", "uses_index")` (batches carry each example's index) or
    `needs("classwise", "needs_holdout")` (it uses held-out data during training).
    """
    _check(name)
    objective_cls, modifier_classes, _ = _DEFENSES[name]
    return any(getattr(c, attribute, False) for c in (objective_cls,) + modifier_classes)


def accepts(name, param):
    """True if a piece of the defense `name` takes the hyper-parameter `param`."""
    _check(name)
    objective_cls, modifier_classes, _ = _DEFENSES[name]
    return any(param in _accepted(c) for c in (objective_cls,) + modifier_classes)


def _check(name):
    if name not in _DEFENSES:
        raise ValueError(f"Unknown defense {name!r}. Expected one of: {', '.join(_DEFENSES)}")


def _accepted(cls):
    params = inspect.signature(cls.__init__).parameters
    return {p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD}


def get(name, **hparams):
    """Returns `(objective, [modifiers])` for the defense called `name`.

    Raises ValueError for an unknown name (listing the valid ones) or a
    hyper-parameter that no piece of this defense takes.
    """
    _check(name)
    objective_cls, modifier_classes, name_defaults = _DEFENSES[name]
    pieces = (objective_cls,) + modifier_classes
    unused = set(hparams) - set().union(*(_accepted(c) for c in pieces))
    if unused:
        raise ValueError(f"Defense {name!r} takes no hyper-parameter(s) {sorted(unused)}. "
                         f"It takes: {sorted(set().union(*(_accepted(c) for c in pieces)))}")
    hparams = {**name_defaults, **hparams}

    def make(cls):
        return cls(**{k: v for k, v in hparams.items() if k in _accepted(cls)})

    return make(objective_cls), [make(m) for m in modifier_classes]


# Feature-layer defenses: a baseline objective composed with a modifier that inserts
# label-conditioned channel layers (auxiliary heads trained with `aux_weight` β = 2).
# AGAIN (Yin et al., CVPR 2023): ASE masks; HFF before the first with hff=1 (`ase.ASE`).
register("again_pgd", PGDAT, [ASE])
register("again_trades", TRADES, [ASE])
register("again_mart", MART, [ASE])
# The official AGAIN-AWP code: --awp-gamma 0.005, AWP when the 1-based epoch >= 10,
# its proxy an SGD at the model's lr 0.1.
register("again_awp", PGDAT, [ASE, AWP], {"gamma": 0.005, "awp_warmup": 9, "proxy_lr": 0.1})
# CAS (Bai et al., ICLR 2021): official TRADES-CAS --beta 4.0, MART-CAS β = 5; the aux
# heads get the KL / MART terms too (`heads.paired_head_loss`).
register("cas", PGDAT, [CAS])
register("cas_trades", TRADES, [CAS], {"beta": 4.0})
register("cas_mart", MART, [CAS], {"beta": 5.0})
# CIFS (Yan et al., ICML 2021).
register("cifs", PGDAT, [CIFS])
# BAT (Xu et al., 2021): memorization-aware PGD-AT; batches carry each example's index.
register("bat", BAT)
# Class-wise robustness (our reading of Tian et al., KDD 2021): class weights from the
# held-out class-wise robust error, a logit offset tuned after training.
register("classwise", PGDAT, [ClasswiseWeights])
register("classwise_trades", TRADES, [ClasswiseWeights])
