"""Channel-wise Importance-based Feature Selection (CIFS), Yan et al., ICML 2021."""

import keras
import tensorflow as tf
from keras import ops

from again_tf.layers.channel_mask import (check_num_classes, per_channel, spatial_mean,
                                          torch_linear_init)


@keras.saving.register_keras_serializable(package="again_tf")
class ChannelImportanceFeatureSelection(keras.layers.Layer):
    """Reweights channels by a softmax of their gradient-based importance to a probe.

    Yan et al., "CIFS: Improving Adversarial Robustness of CNNs via Channel-wise
    Importance-based Feature Selection", ICML 2021. A probe network reads the feature
    map `f` (GAP → Dense(classes), or GAP → Dense(hidden) → Softplus(β=5) →
    Dense(classes) when `hidden_units` is set); on the stop-gradient copy f′ of `f`:

        s = Σ_n [ z_n(t1_n) + z_n(t2_n) ],   z = probe(f′)
            t1 = the label y while a defense trains (`training` and labels given),
                 the top-1 predicted class otherwise (inference, training attack);
            t2 = the probe's second-highest class (its top-2; it may equal y)
        g_c = Σ_{h,w} ∂s/∂f′_{h,w,c}
        CIFS(f) = f ⊙ mask_scale · softmax_c(g)

    The gradient is taken with a nested `tf.GradientTape`, so the mask stays
    differentiable with respect to the probe's weights (PyTorch's
    `create_graph=True`), while no gradient reaches `f` through the mask. Returns
    `(CIFS(f), probe(f))`; the probe logits of the unmasked, non-detached `f` are the
    auxiliary logits, trained (and attacked) with cross-entropy next to the main head.
    Everything follows the official code (github.com/HanshuYAN/CIFS,
    `models/nets/resnet_CIFS.py`), which picks the top-1 term by `model.training`.

    Args:
        num_classes: number of classes of the probe.
        hidden_units: width of the non-linear probe's hidden layer, or None for the
            linear probe. The official ResNet-18 uses 128 for the first block of the
            last stage and a linear probe for the second; its WRN uses 240.
        softplus_beta: β of the hidden Softplus, `log(1 + exp(β·x))/β`. Default 5
            (official code).
        mask_scale: factor on the softmax. Default 1, as the official code: the
            ResNet-18 file `models/nets/resnet_CIFS.py` since commit bb5ff7d (Oct 2021,
            the current one) and the WRN file `wide_resnet_CIFS.py` of the July 2021
            commits. Only two older commits of the ResNet-18 file (2d8217c, 3a3f261)
            multiplied by 2; `mask_scale=2` reproduces those.

    Input shape: `(batch, ..., channels)`.
    Output shape: the input's, and `(batch, num_classes)` probe logits.

    Example:
        model = again_tf.models.ResNet18(10, inserts={
            "stage4.block0": ChannelImportanceFeatureSelection(10, hidden_units=128),
            "stage4.block1": ChannelImportanceFeatureSelection(10)})
    """

    def __init__(self, num_classes, hidden_units=None, softplus_beta=5.0, mask_scale=1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = check_num_classes(num_classes)
        if hidden_units is not None and (int(hidden_units) != hidden_units or hidden_units < 1):
            raise ValueError(f"Expected `hidden_units` None or an integer >= 1. "
                             f"Received: hidden_units={hidden_units}")
        if float(softplus_beta) <= 0:
            raise ValueError(f"Expected `softplus_beta` > 0. Received: softplus_beta={softplus_beta}")
        if float(mask_scale) <= 0:
            raise ValueError(f"Expected `mask_scale` > 0. Received: mask_scale={mask_scale}")
        self.hidden_units = None if hidden_units is None else int(hidden_units)
        self.softplus_beta = float(softplus_beta)
        self.mask_scale = float(mask_scale)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"ChannelImportanceFeatureSelection needs a known channel count. "
                             f"Received: input_shape={tuple(input_shape)}")
        width = channels
        self.hidden = None
        if self.hidden_units is not None:
            self.hidden = keras.layers.Dense(
                self.hidden_units, kernel_initializer=torch_linear_init(channels),
                bias_initializer=torch_linear_init(channels), name="hidden")
            self.hidden.build((None, channels))
            width = self.hidden_units
        self.logits = keras.layers.Dense(
            self.num_classes, kernel_initializer=torch_linear_init(width),
            bias_initializer=torch_linear_init(width), name="logits")
        self.logits.build((None, width))

    def probe(self, inputs):
        """The probe's logits for a feature map."""
        h = spatial_mean(inputs)
        if self.hidden is not None:
            h = ops.softplus(self.softplus_beta * self.hidden(h)) / self.softplus_beta
        return self.logits(h)

    def importance(self, inputs, labels=None, training=None):
        """g: `(batch, channels)` gradient of the top-1/label plus top-2 logits, on f′."""
        detached = tf.stop_gradient(inputs)
        with tf.GradientTape() as tape:
            tape.watch(detached)
            logits = self.probe(detached)
            top2 = ops.top_k(logits, 2)[1]
            first = top2[:, 0]
            if training and labels is not None:
                first = ops.cast(labels, top2.dtype)
            score = (ops.sum(ops.take_along_axis(logits, first[:, None], axis=1))
                     + ops.sum(ops.take_along_axis(logits, top2[:, 1:2], axis=1)))
        grad = tape.gradient(score, detached)
        axes = tuple(range(1, len(inputs.shape) - 1))
        return ops.sum(grad, axis=axes) if axes else grad

    def mask(self, inputs, labels=None, training=None):
        """The `(batch, channels)` mask: mask_scale · softmax over channels of g."""
        return self.mask_scale * ops.softmax(self.importance(inputs, labels, training), axis=-1)

    def call(self, inputs, labels=None, training=None):
        mask = self.mask(inputs, labels, training)
        return inputs * per_channel(mask, len(inputs.shape)), self.probe(inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), (input_shape[0], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "hidden_units": self.hidden_units, "softplus_beta": self.softplus_beta,
                "mask_scale": self.mask_scale}
