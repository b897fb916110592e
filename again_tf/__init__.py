"""again_tf: adversarial training and honest robustness evaluation for Keras 3.

The public API:
    again_tf.AdversarialModel   wrap any classifier; `fit` trains it with a defense
    again_tf.attacks            PGD, FGSM, ... (`attack = PGD(model, eps=...); attack(x, y)`)
    again_tf.defenses           objectives and modifiers; `defenses.names()`
    again_tf.models             SmallCNN, ResNet18, PreActResNet18, WideResNet; `models.build`
    again_tf.data               `data.load(name, split)`, `data.pipeline(...)`
    again_tf.evaluation         `evaluation.evaluate(model, x, y, attacks=["clean", "pgd20"])`
    again_tf.training           `training.train(TrainConfig(...))`, what train.py runs
"""

from again_tf import attacks, data, defenses, evaluation, models
from again_tf.attacks import FGSM, PGD
from again_tf.defenses import AdversarialModel
from again_tf.models import build as build_model

__version__ = "0.1.0"
__all__ = ["AdversarialModel", "FGSM", "PGD", "attacks", "build_model", "data", "defenses",
           "evaluation", "models", "__version__"]
