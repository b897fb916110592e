"""Image classifiers with in-model normalization and named insertion points.

    model = again_tf.models.build("resnet18", num_classes=10,
                                  mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
"""

from again_tf.catalog import MODELS  # the names, kept free of TensorFlow for the CLI help
from again_tf.models.base import PENULTIMATE, Classifier, Standardize, forward
from again_tf.models.preact_resnet import PreActBlock, PreActResNet18
from again_tf.models.resnet import (BasicBlock, BNReLU, ConvBNReLU, ResNet18,
                                    StridedPointwiseConv2D)
from again_tf.models.small_cnn import ConvStage, HiddenDense, SmallCNN
from again_tf.models.wide_resnet import WideBasicBlock, WideResNet

_ALL_NAMES = MODELS + ("wrn",)


def build(name, num_classes, mean=(0.0,), std=(1.0,), inserts=None, **kwargs):
    """Creates an unbuilt classifier by name.

    Args:
        name: one of `MODELS` (`"small_cnn"`, `"resnet18"`, `"preact_resnet18"`,
            `"wrn34_10"`), or `"wrn"` for a `WideResNet` whose `depth` and
            `widen_factor` come from `kwargs` (default 34 and 10).
        num_classes: number of output logits.
        mean: per-channel mean of the training images, in [0, 1] pixel units.
        std: per-channel standard deviation, same units.
        inserts: dict from insertion point to layer, see `Classifier`.
        **kwargs: further constructor arguments (e.g. `width` for `"small_cnn"`,
            `dropout` for the WRNs, `name`).

    Returns:
        The `Classifier`, not yet built.

    Example:
        model = build("wrn", 10, depth=28, widen_factor=4, dropout=0.3)
    """
    common = dict(num_classes=num_classes, mean=mean, std=std, inserts=inserts, **kwargs)
    if name == "small_cnn":
        return SmallCNN(**common)
    if name == "resnet18":
        return ResNet18(**common)
    if name == "preact_resnet18":
        return PreActResNet18(**common)
    if name == "wrn34_10":
        fixed = sorted({"depth", "widen_factor"} & set(kwargs))
        if fixed:
            raise ValueError(
                f"`{'`, `'.join(fixed)}` is fixed by name='wrn34_10' (depth 34, widen_factor "
                f"10). Use name='wrn' to choose them. Received: "
                f"{', '.join(f'{k}={kwargs[k]}' for k in fixed)}")
        return WideResNet(depth=34, widen_factor=10, **common)
    if name == "wrn":
        return WideResNet(**common)
    raise ValueError(f"Unknown model name={name!r}. Expected one of: {', '.join(_ALL_NAMES)}")


__all__ = [
    "MODELS", "PENULTIMATE", "BasicBlock", "BNReLU", "Classifier", "ConvBNReLU", "ConvStage",
    "HiddenDense", "PreActBlock", "PreActResNet18", "ResNet18", "SmallCNN", "Standardize",
    "StridedPointwiseConv2D",
    "WideBasicBlock", "WideResNet", "build", "forward",
]
