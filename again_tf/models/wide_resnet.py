"""The wide ResNet of the TRADES and AWP repositories (WRN-34-10 and its relatives)."""

import keras

from again_tf.models.base import Classifier
from again_tf.models.preact_resnet import PreActBlock
from again_tf.models.resnet import BNReLU, conv2d, make_stages


@keras.saving.register_keras_serializable(package="again_tf")
class WideBasicBlock(PreActBlock):
    """The wide basic block of WRN: a `PreActBlock` with dropout between its convolutions.

    `a = relu(bn1(x))`; output `conv2(dropout(relu(bn2(conv1(a))))) + shortcut`, the
    shortcut being `x`, or a bias-free 1x1 convolution of `a` when the shape changes.

    Args:
        filters: number of output channels.
        strides: stride of the first convolution (and of the shortcut). Default 1.
        dropout: dropout rate between the convolutions, in [0, 1). Default 0.

    Input shape: `(batch, height, width, channels)`.
    Output shape: `(batch, ceil(height / strides), ceil(width / strides), filters)`.

    Example:
        block = WideBasicBlock(320, strides=2, dropout=0.3)

    Reference: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """


@keras.saving.register_keras_serializable(package="again_tf")
class WideResNet(Classifier):
    """The pre-activation wide ResNet WRN-depth-k of TRADES and AWP.

    A 3x3 stem convolution with 16 channels, three stages of `n = (depth - 4) / 6`
    `WideBasicBlock`s with 16k, 32k and 64k channels and strides 1, 2, 2, a final BN-ReLU
    (the `neck`), global average pooling and a Dense head. WRN-34-10 has 46,160,474
    parameters for 10 classes, as the PyTorch model (without TRADES's unused
    `sub_block1`).

    Args:
        depth: total depth; `(depth - 4) % 6 == 0`. Default 34.
        widen_factor: width multiplier k. Default 10.
        num_classes: number of output logits. Default 10.
        dropout: dropout rate inside each block, in [0, 1). Default 0.
        mean: per-channel mean of the training images, in [0, 1] pixel units.
        std: per-channel standard deviation, same units.
        inserts: dict from insertion point (`"stage1.block0"` ...
            `"stage3.block{n-1}"`, `"penultimate"`) to a layer, see `Classifier`.

    Input shape: `(batch, height, width, channels)`, float32 in [0, 1].
    Output shape: `(batch, num_classes)` logits; `forward(...)["features"]` is
    `(batch, 64 * widen_factor)`.

    Example:
        model = WideResNet(34, 10, num_classes=10)   # WRN-34-10
        tiny = WideResNet(depth=10, widen_factor=1)  # one block per stage

    Reference: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
    """

    def __init__(self, depth=34, widen_factor=10, num_classes=10, dropout=0.0, mean=(0.0,),
                 std=(1.0,), inserts=None, **kwargs):
        if int(depth) != depth or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"Expected `depth` with (depth - 4) % 6 == 0 and depth >= 10 "
                f"(e.g. 16, 28, 34). Received: depth={depth}")
        if int(widen_factor) != widen_factor or widen_factor < 1:
            raise ValueError(
                f"Expected `widen_factor` to be an integer >= 1. "
                f"Received: widen_factor={widen_factor}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"Expected `dropout` in [0, 1). Received: dropout={dropout}")
        super().__init__(num_classes, mean=mean, std=std, inserts=inserts, **kwargs)
        self.depth, self.widen_factor, self.dropout = int(depth), int(widen_factor), float(dropout)
        k = self.widen_factor
        self.stem = conv2d(16, 3, 1, name="stem")
        self.blocks, self.block_names = make_stages(
            WideBasicBlock, (16 * k, 32 * k, 64 * k), (1, 2, 2), (self.depth - 4) // 6,
            dropout=self.dropout)
        self.neck = BNReLU(name="neck")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        # float32 logits (and losses) under a mixed-precision policy
        self.fc = keras.layers.Dense(self.num_classes, dtype="float32", name="fc")
        self._check_inserts()

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, widen_factor=self.widen_factor, dropout=self.dropout)
        return config
