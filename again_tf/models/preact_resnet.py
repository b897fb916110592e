"""Pre-activation ResNet-18, as in the "Bag of tricks for AT" and AWP repositories."""

import keras
from keras import ops

from again_tf.models.base import Classifier
from again_tf.models.resnet import (BNReLU, batch_norm, build_chain, check_block_args,
                                    check_width, conv2d, conv_output_shape, make_stages,
                                    torch_padding)


@keras.saving.register_keras_serializable(package="again_tf")
class PreActBlock(keras.layers.Layer):
    """The pre-activation residual block: BN-ReLU-conv, BN-ReLU-conv, plus a shortcut.

    `a = relu(bn1(x))`; the output is `conv2(relu(bn2(conv1(a)))) + shortcut`, where the
    shortcut is `x` itself, or a 1x1 convolution (no BatchNorm) of the pre-activated `a`
    when the stride or width changes. With `dropout > 0`, dropout runs between the two
    convolutions (the wide-ResNet variant). The shortcut is created in `build`.

    Args:
        filters: number of output channels.
        strides: stride of the first convolution (and of the shortcut). Default 1.
        dropout: dropout rate between the convolutions, in [0, 1). Default 0.

    Input shape: `(batch, height, width, channels)`.
    Output shape: `(batch, ceil(height / strides), ceil(width / strides), filters)`.

    Example:
        block = PreActBlock(128, strides=2)
        y = block(keras.ops.zeros((2, 32, 32, 64)))   # (2, 16, 16, 128)

    Reference: He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016.
    """

    def __init__(self, filters, strides=1, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        check_block_args(filters, strides, dropout)
        self.filters, self.strides, self.dropout = int(filters), int(strides), float(dropout)

    def build(self, input_shape):
        self.bn1 = batch_norm(name="bn1")
        self.pad = torch_padding(3, self.strides, name="pad")
        self.conv1 = conv2d(self.filters, 3, self.strides, name="conv1")
        self.bn2 = batch_norm(name="bn2")
        self.drop = keras.layers.Dropout(self.dropout, name="dropout") if self.dropout else None
        self.conv2 = conv2d(self.filters, 3, 1, name="conv2")
        build_chain([self.bn1, self.pad, self.conv1, self.bn2, self.drop, self.conv2],
                    input_shape)
        self.shortcut = None
        if self.strides != 1 or input_shape[-1] != self.filters:
            self.shortcut = conv2d(self.filters, 1, self.strides, name="shortcut")
            self.shortcut.build(input_shape)

    def call(self, x, training=None):
        a = ops.relu(self.bn1(x, training=training))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        h = a if self.pad is None else self.pad(a)
        h = ops.relu(self.bn2(self.conv1(h), training=training))
        if self.drop is not None:
            h = self.drop(h, training=training)
        return self.conv2(h) + shortcut

    def compute_output_shape(self, input_shape):
        return conv_output_shape(input_shape, self.filters, self.strides)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides, dropout=self.dropout)
        return config


@keras.saving.register_keras_serializable(package="again_tf")
class PreActResNet18(Classifier):
    """The pre-activation ResNet-18 of the "Bag of tricks for AT" and AWP code.

    A 3x3 stem convolution with 64 channels (no BatchNorm, no max-pooling), four stages
    of two `PreActBlock`s with 64, 128, 256 and 512 channels and strides 1, 2, 2, 2, a
    final BN-ReLU (the `neck`), global average pooling and a Dense head: 11,172,170
    parameters for 10 classes, as the PyTorch model with its final `bn`.

    Args:
        num_classes: number of output logits. Default 10.
        mean: per-channel mean of the training images, in [0, 1] pixel units.
        std: per-channel standard deviation, same units.
        inserts: dict from insertion point (`"stage1.block0"` ... `"stage4.block1"`,
            `"penultimate"`, after the final BN-ReLU) to a layer, see `Classifier`.
        width: channels of the first stage; the four stages have width x 1, 2, 4, 8.
            Default 64, the papers' network (`width=8` is the CPU default for 28x28 data:
            1/64 of the arithmetic).

    Input shape: `(batch, height, width, channels)`, float32 in [0, 1].
    Output shape: `(batch, num_classes)` logits; `forward(...)["features"]` is
    `(batch, 8 * width)`.

    Example:
        model = PreActResNet18(10, mean=(0.4914, 0.4822, 0.4465),
                               std=(0.2471, 0.2435, 0.2616))
        logits = model(images)

    References: He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016;
    Pang et al., "Bag of Tricks for Adversarial Training", ICLR 2021.
    """

    def __init__(self, num_classes=10, mean=(0.0,), std=(1.0,), inserts=None, width=64,
                 **kwargs):
        super().__init__(num_classes, mean=mean, std=std, inserts=inserts, **kwargs)
        self.width = check_width(width)
        w = self.width
        self.stem = conv2d(w, 3, 1, name="stem")
        self.blocks, self.block_names = make_stages(
            PreActBlock, (w, 2 * w, 4 * w, 8 * w), (1, 2, 2, 2), 2)
        self.neck = BNReLU(name="neck")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        # float32 logits (and losses) under a mixed-precision policy
        self.fc = keras.layers.Dense(self.num_classes, dtype="float32", name="fc")
        self._check_inserts()

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width)
        return config
