"""again_tf: adversarial training and honest robustness evaluation for Keras 3.

The public API:
    again_tf.AdversarialModel   wrap any classifier; `fit` trains it with a defense
    again_tf.attacks            PGD, FGSM, APGD, AutoAttack, ... (`PGD(model, eps=...)(x, y)`)
    again_tf.defenses           objectives and modifiers; `defenses.names()`
    again_tf.layers             ASE, HFF, CAS, CIFS channel layers (serializable Keras layers)
    again_tf.models             SmallCNN, ResNet18, PreActResNet18, WideResNet; `models.build`
    again_tf.data               `data.load(name, split)`, `data.pipeline(...)`
    again_tf.evaluation         `evaluation.evaluate(model, x, y, attacks=["clean", "pgd20"])`
    again_tf.heads              auxiliary heads: training losses, attack objectives, β
    again_tf.analysis           attribution, channels, class-wise report, memorization, sanity
    again_tf.training           `training.train(TrainConfig(...))`, what train.py runs
    again_tf.tuning             `tuning.DefenseHyperModel` (keras-tuner), what tune.py runs

Submodules load on first use, so `import again_tf` alone is cheap (the command-line help
needs no TensorFlow). When TensorFlow is first imported, by again_tf or by the user,
`again_tf.startup` keeps its CPU start-up noise off the terminal, and once Keras is
imported again_tf's Keras classes are registered, so `keras.saving.load_model` finds them.
"""

import importlib

from again_tf import startup

__version__ = "0.1.0"

_SUBMODULES = ("analysis", "attacks", "checkpoint", "data", "defenses", "distribute",
               "evaluation", "heads", "layers", "models", "precision", "training", "tuning")
_NAMES = {"AdversarialModel": ("defenses", "AdversarialModel"), "PGD": ("attacks", "PGD"),
          "FGSM": ("attacks", "FGSM"), "build_model": ("models", "build")}

startup.install()


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"again_tf.{name}")
    if name in _NAMES:
        module, attr = _NAMES[name]
        return getattr(importlib.import_module(f"again_tf.{module}"), attr)
    raise AttributeError(f"module 'again_tf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))


__all__ = ["AdversarialModel", "FGSM", "PGD", "build_model", "__version__", *_SUBMODULES]
