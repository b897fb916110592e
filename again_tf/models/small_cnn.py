"""The small CNN of the MNIST adversarial-training literature (TRADES), with BatchNorm."""

import keras

from again_tf.models.base import Classifier
from again_tf.models.resnet import ConvBNReLU


@keras.saving.register_keras_serializable(package="again_tf")
class ConvStage(keras.layers.Layer):
    """Two conv3x3-BN-ReLU layers ("same" padding) and a 2x2 max-pooling.

    Args:
        filters: number of output channels of both convolutions.

    Input shape: `(batch, height, width, channels)`.
    Output shape: `(batch, height // 2, width // 2, filters)`.

    Example:
        stage = ConvStage(32)
        y = stage(keras.ops.zeros((2, 28, 28, 1)))   # (2, 14, 14, 32)
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        if int(filters) < 1:
            raise ValueError(f"Expected `filters` >= 1. Received: filters={filters}")
        self.filters = int(filters)

    def build(self, input_shape):
        self.conv1 = ConvBNReLU(self.filters, name="conv1")
        self.conv2 = ConvBNReLU(self.filters, name="conv2")
        self.maxpool = keras.layers.MaxPooling2D(2, name="maxpool")
        shape = tuple(input_shape[:-1]) + (self.filters,)
        self.conv1.build(tuple(input_shape))
        self.conv2.build(shape)
        self.maxpool.build(shape)

    def call(self, x, training=None):
        return self.maxpool(self.conv2(self.conv1(x, training=training), training=training))

    def compute_output_shape(self, input_shape):
        def half(s):
            return None if s is None else s // 2
        return (input_shape[0], half(input_shape[1]), half(input_shape[2]), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters)
        return config


@keras.saving.register_keras_serializable(package="again_tf")
class HiddenDense(keras.layers.Layer):
    """Flattens a feature map and applies `depth` Dense-ReLU layers of `units` units.

    Args:
        units: width of each hidden layer.
        depth: number of Dense-ReLU layers. Default 2.

    Input shape: `(batch, ...)`. Output shape: `(batch, units)`.

    Example:
        head = HiddenDense(200)
        y = head(keras.ops.zeros((2, 7, 7, 64)))   # (2, 200)
    """

    def __init__(self, units, depth=2, **kwargs):
        super().__init__(**kwargs)
        if int(units) < 1 or int(depth) < 1:
            raise ValueError(
                f"Expected `units` >= 1 and `depth` >= 1. Received: units={units}, depth={depth}")
        self.units, self.depth = int(units), int(depth)

    def build(self, input_shape):
        self.flatten = keras.layers.Flatten(name="flatten")
        self.dense = [keras.layers.Dense(self.units, activation="relu",
                                         kernel_initializer="he_normal", name=f"dense{i}")
                      for i in range(self.depth)]
        shape = self.flatten.compute_output_shape(tuple(input_shape))
        for layer in self.dense:
            layer.build(shape)
            shape = (shape[0], self.units)

    def call(self, x):
        h = self.flatten(x)
        for layer in self.dense:
            h = layer(h)
        return h

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, depth=self.depth)
        return config


@keras.saving.register_keras_serializable(package="again_tf")
class SmallCNN(Classifier):
    """The small four-convolution CNN used for MNIST/Fashion-MNIST adversarial training.

    The TRADES MNIST network with BatchNorm added after every convolution (before its
    ReLU) and "same" padding: stage1 = two conv3x3(width)-BN-ReLU and a 2x2 max-pool,
    stage2 = two conv3x3(2*width)-BN-ReLU and a 2x2 max-pool, then Flatten and two
    Dense(hidden)-ReLU layers (the pooled `features`, no dropout) and a Dense head.
    On 28x28x1 inputs with the defaults it has 734,794 parameters; `width` shrinks it
    for fast CPU runs. Any input size works; the Dense layers fix it at build time.

    Args:
        num_classes: number of output logits. Default 10.
        width: channels of the first stage (the second has twice as many). Default 32.
        hidden: units of the two hidden Dense layers. Default 200.
        mean: per-channel mean of the training images, in [0, 1] pixel units.
        std: per-channel standard deviation, same units.
        inserts: dict from insertion point (`"stage1"`, `"stage2"`, `"penultimate"`,
            the map after stage2) to a layer, see `Classifier`.

    Input shape: `(batch, height, width, channels)`, float32 in [0, 1] (28x28x1).
    Output shape: `(batch, num_classes)` logits; `forward(...)["features"]` is
    `(batch, hidden)`.

    Example:
        model = SmallCNN(10, width=16, mean=(0.2860,), std=(0.3530,))  # Fashion-MNIST
        logits = model(images)

    Reference: Zhang et al., "Theoretically Principled Trade-off between Robustness and
    Accuracy" (TRADES), ICML 2019; Carlini & Wagner, IEEE S&P 2017.
    """

    def __init__(self, num_classes=10, width=32, hidden=200, mean=(0.0,), std=(1.0,),
                 inserts=None, **kwargs):
        if int(width) != width or width < 1:
            raise ValueError(f"Expected `width` to be an integer >= 1. Received: width={width}")
        if int(hidden) != hidden or hidden < 1:
            raise ValueError(
                f"Expected `hidden` to be an integer >= 1. Received: hidden={hidden}")
        super().__init__(num_classes, mean=mean, std=std, inserts=inserts, **kwargs)
        self.width, self.hidden = int(width), int(hidden)
        self.stem = keras.layers.Identity(name="stem")
        self.blocks = [ConvStage(self.width, name="stage1"),
                       ConvStage(2 * self.width, name="stage2")]
        self.block_names = ("stage1", "stage2")
        self.neck = None
        self.pool = HiddenDense(self.hidden, depth=2, name="pool")
        # float32 logits (and losses) under a mixed-precision policy
        self.fc = keras.layers.Dense(self.num_classes, dtype="float32", name="fc")
        self._check_inserts()

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width, hidden=self.hidden)
        return config
