"""The shared base of the label-conditioned channel masks (CAS and ASE).

A linear auxiliary head reads the globally pooled feature map; column `k` of its kernel
`W` (channels × classes) is also the channel mask of class `k`. While a defense trains,
the mask is chosen by the true labels; on the inference path by the head's own
prediction. The mask is the raw weight column: not normalized, possibly negative, and
not detached, so the main loss trains `W` through the mask as well as through the
auxiliary cross-entropy.
"""

import math

import keras
from keras import ops


def spatial_mean(x):
    """Mean over every axis between the batch and the channel axis (none for rank 2)."""
    axes = tuple(range(1, len(x.shape) - 1))
    return ops.mean(x, axis=axes) if axes else x


def per_channel(mask, rank):
    """Reshapes a `(batch, channels)` mask to broadcast over a rank-`rank` feature map."""
    for _ in range(rank - 2):
        mask = ops.expand_dims(mask, 1)
    return mask


def torch_linear_init(fan_in):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the default kernel init of PyTorch's nn.Linear.

    The official CAS, AGAIN and CIFS heads are `nn.Linear` layers with this init; the
    scale matters here because the kernel is also the channel mask.
    """
    limit = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-limit, limit)


def check_num_classes(num_classes):
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"Expected `num_classes` to be an integer >= 2. "
                         f"Received: num_classes={num_classes}")
    return int(num_classes)


@keras.saving.register_keras_serializable(package="again_tf")
class ClassChannelMask(keras.layers.Layer):
    """Multiplies each channel by the class-`k` column of an auxiliary head's kernel.

    `aux_logits = GAP(h) @ W + b`; the output is `h ⊙ m` per channel, with `m = W[:, y]`
    when `training` is True and `labels` are given (see `training_mask`, which
    subclasses change), and `m = W[:, argmax aux_logits]` otherwise — also inside the
    training attack, which runs in inference mode, as the official CAS and AGAIN code
    runs it under `model.eval()`. Returns `(h ⊙ m, aux_logits)`.

    Args:
        num_classes: number of classes of the auxiliary head.

    `W` is initialized U(±1/sqrt(channels)) as PyTorch's `nn.Linear` (the official
    code's head), `b` with zeros (as the AGAIN WRN code re-initializes it).

    Input shape: `(batch, ..., channels)` (usually `(batch, height, width, channels)`).
    Output shape: the input's, and `(batch, num_classes)` auxiliary logits.

    Example:
        layer = ClassChannelMask(10)
        h, aux = layer(features, labels=y, training=True)
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"{type(self).__name__} needs a known channel count. "
                             f"Received: input_shape={tuple(input_shape)}")
        self.kernel = self.add_weight(shape=(channels, self.num_classes), name="kernel",
                                      initializer=torch_linear_init(channels))
        self.bias = self.add_weight(shape=(self.num_classes,), name="bias",
                                    initializer="zeros")

    def aux_logits(self, inputs):
        """The auxiliary head on the globally pooled (unmasked) features."""
        return ops.matmul(spatial_mean(inputs), self.kernel) + self.bias

    def class_masks(self, classes):
        """`W[:, classes]` as `(batch, channels)`."""
        return ops.take(ops.transpose(self.kernel), ops.cast(classes, "int32"), axis=0)

    def training_mask(self, labels):
        """The mask while a defense trains: `W[:, y]`."""
        return self.class_masks(labels)

    # Accepts `relax` (a temperature) to let attacks differentiate through the mask choice.
    relaxable = True

    def mask(self, aux_logits, labels=None, training=None, relax=None):
        """The `(batch, channels)` mask this call applies.

        On the inference path the mask `W[:, argmax a]` is piecewise constant in the
        auxiliary logits `a`, so no gradient reaches the choice. With `relax = T > 0`
        (attacks only, `Classifier.forward(..., relax_masks=T)`) the mask keeps that value
        but takes the gradient of the soft mask `W · softmax(a / T)`: the straight-through
        form of BPDA (Athalye et al., ICML 2018), `hard + soft − stop_gradient(soft)`.
        """
        if training and labels is not None:
            return self.training_mask(labels)
        hard = self.class_masks(ops.argmax(aux_logits, axis=-1))
        if relax is None:
            return hard
        weights = ops.softmax(ops.cast(aux_logits, "float32") / float(relax), axis=-1)
        soft = ops.cast(ops.matmul(weights, ops.transpose(ops.cast(self.kernel, "float32"))),
                        hard.dtype)
        return hard + soft - ops.stop_gradient(soft)

    def call(self, inputs, labels=None, training=None, relax=None):
        logits = self.aux_logits(inputs)
        mask = self.mask(logits, labels, training, relax)
        return inputs * per_channel(mask, len(inputs.shape)), logits

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
