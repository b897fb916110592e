"""CIFAR-style ResNet-18, and the convolution/BatchNorm helpers every architecture shares.

All convolutions that feed a BatchNorm have no bias and He-normal kernels. BatchNorm uses
`momentum=0.9, epsilon=1e-5`, the Keras spelling of PyTorch's `momentum=0.1, eps=1e-5`
(Keras keeps 0.9 of the old moving average, PyTorch mixes in 0.1 of the new batch).
A 3x3 convolution with stride 2 pads one pixel on every side, as PyTorch's `padding=1`
does (Keras's "same" would pad only the bottom/right), so weights ported from the
reference PyTorch repositories give the same outputs.
"""

import keras
from keras import ops

from again_tf.models.base import Classifier

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv2d(filters, kernel_size=3, strides=1, name=None):
    """A bias-free, He-normal `Conv2D`: "same" padding at stride 1, "valid" otherwise.

    At stride > 1 a kernel larger than 1 needs `torch_padding(...)` in front of it; a 1x1
    kernel at stride > 1 is a `StridedPointwiseConv2D` (same function, same weights).
    """
    if kernel_size == 1 and strides > 1:
        return StridedPointwiseConv2D(filters, subsample=strides, use_bias=False,
                                      kernel_initializer="he_normal", name=name)
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same" if strides == 1 else "valid",
        use_bias=False, kernel_initializer="he_normal", name=name)


@keras.saving.register_keras_serializable(package="again_tf")
class StridedPointwiseConv2D(keras.layers.Conv2D):
    """`Conv2D(filters, 1, strides=s)` computed as a stride-1 1x1 convolution of the input's
    every s-th row and column (`x[:, ::s, ::s]`, channels last).

    A 1x1 kernel at stride s reads exactly those pixels, so the function, the `kernel`
    variable and the saved weights are those of the strided `Conv2D`. Why not the strided
    op itself: on CPUs without AVX-512, TensorFlow 2.21's oneDNN kernel for the weight
    gradient of a strided 1x1 convolution with fewer than 8 input channels writes past its
    workspace (oneDNN issue #6035): wrong kernel gradients (relative error ~0.5-0.9,
    measured with ONEDNN_MAX_CPU_ISA=AVX2), and heap corruption with one intra-op thread.
    Its stride-1 kernel is not affected (`again_tf.onednn`; tests/test_models.py checks the
    blocks' shortcut gradients in a process held to AVX2 code).

    Args:
        filters: number of output channels.
        subsample: the stride s, >= 1. Default 2.
        **kwargs: other `Conv2D` arguments (kernel size, strides and padding are fixed).

    Input shape: `(batch, height, width, channels)`.
    Output shape: `(batch, ceil(height / s), ceil(width / s), filters)`.
    """

    def __init__(self, filters, subsample=2, **kwargs):
        if int(subsample) < 1:
            raise ValueError(f"Expected `subsample` >= 1. Received: subsample={subsample}")
        kwargs.update(kernel_size=1, strides=1, padding="valid", data_format="channels_last")
        super().__init__(filters, **kwargs)
        self.subsample = int(subsample)

    def call(self, inputs):
        s = self.subsample
        return super().call(inputs[:, ::s, ::s, :])

    def compute_output_shape(self, input_shape):
        return conv_output_shape(input_shape, self.filters, self.subsample)

    def get_config(self):
        config = super().get_config()
        config.update(subsample=self.subsample)
        return config


def torch_padding(kernel_size, strides, name=None):
    """`ZeroPadding2D(k // 2)` when a strided conv needs PyTorch's padding, else `None`."""
    if strides == 1 or kernel_size == 1:
        return None
    return keras.layers.ZeroPadding2D(kernel_size // 2, name=name)


def batch_norm(name=None):
    """A `BatchNormalization` with PyTorch's defaults (momentum 0.9 in Keras terms, eps 1e-5)."""
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def build_chain(layers, input_shape):
    """Builds `layers` (skipping `None`) one after the other; returns the output shape."""
    shape = tuple(input_shape)
    for layer in layers:
        if layer is not None:
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
    return shape


def conv_output_shape(input_shape, filters, strides):
    """Output shape of a padded 3x3 (or 1x1) conv: spatial size ceil(size / strides)."""
    def size(s):
        return None if s is None else (s - 1) // strides + 1
    return (input_shape[0], size(input_shape[1]), size(input_shape[2]), filters)


def check_block_args(filters, strides, dropout=0.0):
    if int(filters) < 1:
        raise ValueError(f"Expected `filters` >= 1. Received: filters={filters}")
    if int(strides) < 1:
        raise ValueError(f"Expected `strides` >= 1. Received: strides={strides}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"Expected `dropout` in [0, 1). Received: dropout={dropout}")


def check_width(width):
    """The first stage's channel count of a ResNet (the later stages have 2x, 4x, 8x)."""
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"Expected `width` a positive integer (channels of the first stage; "
                         f"64 is the papers' ResNet-18). Received: width={width!r}")
    return int(width)


def make_stages(block, widths, strides, blocks_per_stage, **block_kwargs):
    """Creates the blocks of a multi-stage net and their names `"stage{s}.block{b}"`.

    The first block of each stage uses the stage's stride, the others stride 1.
    """
    blocks, names = [], []
    for s, (width, stride) in enumerate(zip(widths, strides), start=1):
        for b in range(blocks_per_stage):
            name = f"stage{s}.block{b}"
            blocks.append(block(width, strides=stride if b == 0 else 1, name=name,
                                **block_kwargs))
            names.append(name)
    return blocks, tuple(names)


@keras.saving.register_keras_serializable(package="again_tf")
class ConvBNReLU(keras.layers.Layer):
    """Convolution (no bias, He-normal), BatchNorm and ReLU.

    Args:
        filters: number of output channels.
        kernel_size: square kernel size. Default 3.
        strides: stride. Default 1.

    Input shape: `(batch, height, width, channels)`.
    Output shape: `(batch, ceil(height / strides), ceil(width / strides), filters)`.

    Example:
        stem = ConvBNReLU(64)   # the ResNet-18 CIFAR stem
    """

    def __init__(self, filters, kernel_size=3, strides=1, **kwargs):
        super().__init__(**kwargs)
        check_block_args(filters, strides)
        self.filters, self.kernel_size, self.strides = int(filters), int(kernel_size), int(strides)

    def build(self, input_shape):
        self.pad = torch_padding(self.kernel_size, self.strides, name="pad")
        self.conv = conv2d(self.filters, self.kernel_size, self.strides, name="conv")
        self.bn = batch_norm(name="bn")
        build_chain([self.pad, self.conv, self.bn], input_shape)

    def call(self, x, training=None):
        if self.pad is not None:
            x = self.pad(x)
        return ops.relu(self.bn(self.conv(x), training=training))

    def compute_output_shape(self, input_shape):
        return conv_output_shape(input_shape, self.filters, self.strides)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides)
        return config


@keras.saving.register_keras_serializable(package="again_tf")
class BNReLU(keras.layers.Layer):
    """BatchNorm followed by ReLU: the final "neck" of the pre-activation networks.

    Input shape: `(batch, ..., channels)`. Output shape: same as input.

    Example:
        neck = BNReLU()
    """

    def build(self, input_shape):
        self.bn = batch_norm(name="bn")
        self.bn.build(input_shape)

    def call(self, x, training=None):
        return ops.relu(self.bn(x, training=training))

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="again_tf")
class BasicBlock(keras.layers.Layer):
    """The two-convolution residual block of ResNet-18/34 (post-activation).

    `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, where the shortcut is the
    identity, or a 1x1 convolution with BatchNorm when the stride or width changes.
    The shortcut is created in `build`, from the input's channel count.

    Args:
        filters: number of output channels.
        strides: stride of the first convolution (and of the shortcut). Default 1.

    Input shape: `(batch, height, width, channels)`.
    Output shape: `(batch, ceil(height / strides), ceil(width / strides), filters)`.

    Example:
        block = BasicBlock(128, strides=2)
        y = block(keras.ops.zeros((2, 32, 32, 64)))   # (2, 16, 16, 128)

    Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        check_block_args(filters, strides)
        self.filters, self.strides = int(filters), int(strides)

    def build(self, input_shape):
        self.pad = torch_padding(3, self.strides, name="pad")
        self.conv1 = conv2d(self.filters, 3, self.strides, name="conv1")
        self.bn1 = batch_norm(name="bn1")
        self.conv2 = conv2d(self.filters, 3, 1, name="conv2")
        self.bn2 = batch_norm(name="bn2")
        build_chain([self.pad, self.conv1, self.bn1, self.conv2, self.bn2], input_shape)
        self.shortcut_conv = self.shortcut_bn = None
        if self.strides != 1 or input_shape[-1] != self.filters:
            self.shortcut_conv = conv2d(self.filters, 1, self.strides, name="shortcut_conv")
            self.shortcut_bn = batch_norm(name="shortcut_bn")
            build_chain([self.shortcut_conv, self.shortcut_bn], input_shape)

    def call(self, x, training=None):
        h = x if self.pad is None else self.pad(x)
        h = ops.relu(self.bn1(self.conv1(h), training=training))
        h = self.bn2(self.conv2(h), training=training)
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_bn(self.shortcut_conv(x), training=training)
        return ops.relu(h + shortcut)

    def compute_output_shape(self, input_shape):
        return conv_output_shape(input_shape, self.filters, self.strides)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides)
        return config


@keras.saving.register_keras_serializable(package="again_tf")
class ResNet18(Classifier):
    """The CIFAR-style ResNet-18 of the adversarial-training literature.

    A 3x3 stem convolution with 64 channels, BatchNorm and ReLU (no max-pooling), four
    stages of two `BasicBlock`s with 64, 128, 256 and 512 channels and strides 1, 2, 2, 2,
    global average pooling and a Dense head: 11,173,962 parameters for 10 classes, as
    the PyTorch model of the "Bag of tricks for AT" and AWP repositories.

    Args:
        num_classes: number of output logits. Default 10.
        mean: per-channel mean of the training images, in [0, 1] pixel units.
        std: per-channel standard deviation, same units.
        inserts: dict from insertion point (`"stage1.block0"` ... `"stage4.block1"`,
            `"penultimate"`) to a layer, see `Classifier`.
        width: channels of the first stage; the four stages have width x 1, 2, 4, 8.
            Default 64, the papers' network (`width=8` is the CPU default for 28x28 data:
            1/64 of the arithmetic).

    Input shape: `(batch, height, width, channels)`, float32 in [0, 1] (32x32 for CIFAR).
    Output shape: `(batch, num_classes)` logits; `forward(...)["features"]` is
    `(batch, 8 * width)`.

    Example:
        model = ResNet18(10, mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
        logits = model(images)

    Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """

    def __init__(self, num_classes=10, mean=(0.0,), std=(1.0,), inserts=None, width=64,
                 **kwargs):
        super().__init__(num_classes, mean=mean, std=std, inserts=inserts, **kwargs)
        self.width = check_width(width)
        w = self.width
        self.stem = ConvBNReLU(w, name="stem")
        self.blocks, self.block_names = make_stages(
            BasicBlock, (w, 2 * w, 4 * w, 8 * w), (1, 2, 2, 2), 2)
        self.neck = None
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        # float32 logits (and losses) under a mixed-precision policy
        self.fc = keras.layers.Dense(self.num_classes, dtype="float32", name="fc")
        self._check_inserts()

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width)
        return config
