"""Hyper-parameter search for the defenses with keras-tuner, maximizing robust accuracy.

    hypermodel = DefenseHyperModel("trades", classifier=lambda: models.build("small_cnn", 10),
                                   input_shape=(28, 28, 1), eps=0.1)
    tuner = make_tuner("bayesian", hypermodel, max_trials=20, directory="runs/tune")
    tuner.search(train_ds, validation_data=val_ds, epochs=5)
    print(summary_table(tuner))          # one row per trial, best first

The objective is `val_robust_accuracy` (PGD accuracy on the validation data, logged by
`AdversarialModel.test_step`), direction max. Only the hyper-parameters the chosen
defense takes are searched (`tunable(defense)`); the learning rate and the coupled
weight decay always are.
"""

import inspect

import keras
import keras_tuner

from again_tf.defenses import registry
from again_tf.defenses.adversarial_model import AdversarialModel
from again_tf.defenses.base import Modifier

OBJECTIVE = keras_tuner.Objective("val_robust_accuracy", direction="max")
TUNERS = ("random", "bayesian", "hyperband")


def _takes(piece, name):
    return name in inspect.signature(type(piece).__init__).parameters


def _space(hp, name, optimizer):
    """The search range of each tunable hyper-parameter (defaults in brackets)."""
    if name == "beta":  # TRADES/MART/LBGAT β [6]: TRADES' 1/λ sweep spans 1..10
        return hp.Float("beta", 1.0, 10.0)
    if name == "gamma":  # AWP γ [0.01 AT-AWP, 0.005 TRADES-AWP], AWP's Fig. 4 range
        return hp.Float("gamma", 1e-3, 2e-2, sampling="log")
    if name == "ase_alpha":  # AGAIN's ASE α [0.6]
        return hp.Float("ase_alpha", 0.1, 0.9, step=0.1)
    if name == "aux_weight":  # β of the auxiliary heads of ASE/CAS/CIFS [2]
        return hp.Float("aux_weight", 0.5, 4.0)
    if name == "lr":  # Adam [1e-3] or SGD [0.1]
        low, high = (1e-4, 1e-2) if optimizer == "adam" else (1e-2, 0.3)
        return hp.Float("lr", low, high, sampling="log")
    if name == "weight_decay":  # coupled L2 [5e-4 in the CIFAR recipes]
        return hp.Choice("weight_decay", [0.0, 1e-4, 5e-4])
    raise ValueError(f"No search range for {name!r}. Expected one of: {', '.join(SEARCHABLE)}")


SEARCHABLE = ("beta", "gamma", "ase_alpha", "aux_weight", "lr", "weight_decay")


def tunable(defense, **fixed):
    """The hyper-parameters of `SEARCHABLE` that `defense` takes, in that order.

    `fixed` are hyper-parameters the defense needs to be built (e.g. BAT's
    `memorization_scores`); they are not searched.

    `beta` when the objective takes it and no modifier takes a `beta` of its own (the
    registry would hand it to both), `gamma` and `ase_alpha` when a piece takes them,
    `aux_weight` when a modifier inserts layers with auxiliary heads; `lr` and
    `weight_decay` always.
    """
    objective, modifiers = registry.get(defense, **fixed)
    names = []
    if _takes(objective, "beta") and not any(_takes(m, "beta") for m in modifiers):
        names.append("beta")
    for name in ("gamma", "ase_alpha"):
        if any(_takes(p, name) for p in [objective] + modifiers):
            names.append(name)
    if any(type(m).inserts is not Modifier.inserts for m in modifiers):
        names.append("aux_weight")
    return [n for n in names if n not in fixed] + ["lr", "weight_decay"]


class DefenseHyperModel(keras_tuner.HyperModel):
    """Builds an `AdversarialModel` for one defense from the hyper-parameters `hp` samples.

    Args:
        defense: a registered defense name.
        classifier: a function returning a new, unbuilt classifier (one per trial).
        input_shape: the images' shape without the batch axis, e.g. (28, 28, 1).
        eps, step_size, steps, norm, eval_steps: the training and validation attacks
            (`AdversarialModel`'s arguments; eval_steps ≥ 1, the objective needs them).
        optimizer: "adam" or "sgd" (momentum 0.9). Default "adam".
        search: names to search, a subset of `tunable(defense)`; default all of them.
            The others keep their defaults (the defense's, lr 1e-3 Adam / 0.1 SGD,
            weight decay 0).
        fixed: hyper-parameters passed to the defense as they are (not searched).
        seed: seed of the attacks.
        jit_compile: `compile`'s XLA setting. Default "auto" (Keras': XLA when it can).

    Example:
        hm = DefenseHyperModel("awp", lambda: models.build("small_cnn", 10, width=8),
                               (28, 28, 1), eps=0.1, search=["gamma", "lr"])
    """

    def __init__(self, defense, classifier, input_shape, eps, step_size=None, steps=10,
                 norm="linf", eval_steps=10, optimizer="adam", search=None, fixed=None,
                 seed=None, jit_compile="auto"):
        super().__init__(name=f"{defense}_hypermodel")
        available = tunable(defense, **dict(fixed or {}))
        search = list(available if search is None else search)
        unknown = [s for s in search if s not in available]
        if unknown:
            raise ValueError(f"--search={','.join(search)}: defense {defense!r} takes no "
                             f"{', '.join(unknown)}. It can search: {', '.join(available)}")
        if int(eval_steps) < 1:
            raise ValueError(f"--eval_steps={eval_steps}: the objective val_robust_accuracy "
                             f"needs a validation attack (at least 1 step)")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer={optimizer!r} is unknown. Expected adam or sgd")
        self.defense, self.classifier, self.input_shape = defense, classifier, tuple(input_shape)
        self.attack = dict(eps=eps, step_size=step_size, steps=steps, norm=norm,
                           eval_steps=eval_steps, seed=seed)
        self.optimizer, self.search, self.fixed = optimizer, search, dict(fixed or {})
        self.jit_compile = jit_compile

    def build(self, hp):
        values = {name: _space(hp, name, self.optimizer) for name in self.search}
        lr = values.pop("lr", 1e-3 if self.optimizer == "adam" else 0.1)
        weight_decay = values.pop("weight_decay", 0.0)
        adv = AdversarialModel(self.classifier(), defense=self.defense,
                               weight_decay=weight_decay, **self.attack,
                               **{**self.fixed, **values})
        adv.build((None,) + self.input_shape)
        optimizer = (keras.optimizers.Adam(lr) if self.optimizer == "adam"
                     else keras.optimizers.SGD(lr, momentum=0.9))
        adv.compile(optimizer=optimizer, jit_compile=self.jit_compile)
        return adv

    def fit(self, hp, model, *args, **kwargs):
        return model.fit(*args, **kwargs)


def make_tuner(kind, hypermodel, max_trials=10, max_epochs=None, directory="runs/tune",
               project_name=None, overwrite=False, seed=None):
    """A keras-tuner tuner maximizing `val_robust_accuracy`.

    Args:
        kind: "random" (RandomSearch), "bayesian" (BayesianOptimization, Gaussian
            process) or "hyperband" (Hyperband, Li et al., JMLR 2018).
        hypermodel: a `DefenseHyperModel`.
        max_trials: the search budget of random and Bayesian search (trials = trainings).
        max_epochs: Hyperband's largest per-model budget (its budget in place of
            `max_trials`; required for "hyperband").
        directory, project_name: where trials are stored (resumed unless `overwrite`).
        seed: the tuner's own random seed.
    """
    common = dict(objective=OBJECTIVE, directory=directory, overwrite=overwrite, seed=seed,
                  project_name=project_name or hypermodel.defense)
    if kind == "random":
        return keras_tuner.RandomSearch(hypermodel, max_trials=max_trials, **common)
    if kind == "bayesian":
        return keras_tuner.BayesianOptimization(hypermodel, max_trials=max_trials, **common)
    if kind == "hyperband":
        if not max_epochs or max_epochs < 2:
            raise ValueError(f"--epochs={max_epochs}: Hyperband needs at least 2 epochs "
                             f"(its largest per-trial budget)")
        return keras_tuner.Hyperband(hypermodel, max_epochs=max_epochs, factor=3, **common)
    raise ValueError(f"--tuner={kind!r} is unknown. Expected one of: {', '.join(TUNERS)}")


def summary_rows(tuner, top=None):
    """One dict per completed trial, best first: trial id, the searched values, the score."""
    trials = [t for t in tuner.oracle.trials.values() if t.score is not None]
    trials.sort(key=lambda t: t.score, reverse=True)
    rows = []
    for t in trials[:top]:
        values = {k: v for k, v in t.hyperparameters.values.items()
                  if not k.startswith("tuner/")}
        rows.append({"trial": t.trial_id, **values, OBJECTIVE.name: round(float(t.score), 4)})
    return rows


def summary_table(tuner, top=None):
    """The trials as a plain-text table, best first (see `summary_rows`)."""
    from again_tf.evaluation import format_table

    rows = summary_rows(tuner, top)
    if not rows:
        return "(no completed trial)"
    headers = list(dict.fromkeys(k for r in rows for k in r))
    headers.remove(OBJECTIVE.name)
    return format_table([{k: v if k == OBJECTIVE.name else _short(v) for k, v in r.items()}
                         for r in rows], headers + [OBJECTIVE.name])


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value
