"""Defense names: each is an objective composed with modifiers.

`get("trades_awp", beta=6.0, gamma=0.005)` builds the objective and modifiers and hands
each hyper-parameter to the piece whose constructor takes it.
"""

import inspect

from again_tf.defenses.pgd_at import PGDAT
from again_tf.defenses.standard import Standard

# name -> (objective class, modifier classes)
_DEFENSES = {
    "none": (Standard, ()),
    "pgd_at": (PGDAT, ()),
}


def register(name, objective, modifiers=()):
    """Adds (or replaces) the defense `name` = `objective` composed with `modifiers`."""
    _DEFENSES[name] = (objective, tuple(modifiers))


def names():
    """The registered defense names."""
    return tuple(_DEFENSES)


def _accepted(cls):
    params = inspect.signature(cls.__init__).parameters
    return {p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD}


def get(name, **hparams):
    """Returns `(objective, [modifiers])` for the defense called `name`.

    Raises ValueError for an unknown name (listing the valid ones) or a
    hyper-parameter that no piece of this defense takes.
    """
    if name not in _DEFENSES:
        raise ValueError(f"Unknown defense {name!r}. Expected one of: {', '.join(_DEFENSES)}")
    objective_cls, modifier_classes = _DEFENSES[name]
    pieces = (objective_cls,) + modifier_classes
    unused = set(hparams) - set().union(*(_accepted(c) for c in pieces))
    if unused:
        raise ValueError(f"Defense {name!r} takes no hyper-parameter(s) {sorted(unused)}. "
                         f"It takes: {sorted(set().union(*(_accepted(c) for c in pieces)))}")

    def make(cls):
        return cls(**{k: v for k, v in hparams.items() if k in _accepted(cls)})

    return make(objective_cls), [make(m) for m in modifier_classes]
