"""The classifier base: normalization, named blocks, insertion points, a linear head.

Every architecture in `again_tf.models` is a `Classifier`: it normalizes [0, 1] pixels
inside the model (so attacks work in pixel space), runs a stack of named blocks, and
ends with pooling and a Dense head. Layers can be inserted after any named block and
at the penultimate feature map without rewriting the architecture:

    model = again_tf.models.build("resnet18", num_classes=10,
                                  inserts={"stage4.block1": SomeChannelLayer(...)})

An inserted layer is called as `layer(h, labels=labels, training=training)` and returns
either the new feature map or a tuple `(feature_map, aux_logits)`; auxiliary logits are
collected in `Classifier.forward(...)["aux_logits"]`. `labels` is the batch's true labels
while a defense trains (label-conditioned layers such as ASE and CAS use them) and `None`
on the inference path (those layers then use their own predicted class).
"""

import keras
import numpy as np
from keras import ops

PENULTIMATE = "penultimate"


def forward(model, x, training=False, labels=None, relax_masks=None):
    """Runs any classifier and returns `{"logits", "aux_logits", "features"}`.

    A `Classifier` gives its auxiliary logits and pooled features; any other Keras model
    that maps images to logits gives its logits, no auxiliary heads and `features=None`.
    `relax_masks`: see `Classifier.forward`.
    """
    if isinstance(model, Classifier):
        return model.forward(x, training=training, labels=labels, relax_masks=relax_masks)
    return {"logits": model(x, training=training), "aux_logits": [], "features": None}


@keras.saving.register_keras_serializable(package="again_tf")
class Standardize(keras.layers.Layer):
    """Computes `(x - mean) / std` per channel, in the layer's compute dtype.

    Unlike `keras.layers.Normalization`, which turns its statistics into tensors once at
    build time, the constants are made at every call, so a model first built inside a
    `tf.function` (or by Keras's symbolic build in `fit`) still runs eagerly afterwards.

    Args:
        mean: per-channel means (one value, or one per input channel).
        std: per-channel standard deviations, same length, all > 0.

    Input shape: `(..., channels)`. Output shape: same as input.
    """

    def __init__(self, mean, std, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is not None and len(self.mean) not in (1, channels):
            raise ValueError(
                f"Expected `mean` and `std` of length 1 or {channels} (the input's channel "
                f"count). Received: mean={self.mean}, std={self.std}, "
                f"input_shape={tuple(input_shape)}")

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mean=self.mean, std=self.std)
        return config


@keras.saving.register_keras_serializable(package="again_tf")
class Classifier(keras.Model):
    """Base class of the image classifiers, with named insertion points.

    Subclasses create, in `__init__`, `self.stem`, `self.blocks` (a list of layers),
    `self.block_names` (one name per block, e.g. `"stage4.block1"`), `self.neck` (what
    runs after the last block, e.g. the final BN-ReLU of a pre-activation net; may be
    `None`), `self.pool` (feature map -> feature vector) and `self.fc` (the Dense head),
    and list their own constructor arguments in `get_config`.

    Args:
        num_classes: number of output logits.
        mean: per-channel mean of the training images, in [0, 1] pixel units.
        std: per-channel standard deviation, same units. `(x - mean) / std` runs inside
            the model, so the model's input is always an image in [0, 1].
        inserts: dict from insertion-point name (see `points`) to a layer.
        aux_weight: β of the combined loss CE(main) + β·mean CE(aux) that inserted
            auxiliary heads were trained with (`AdversarialModel` sets it from its
            objective), so that an evaluation attacks the loss the model was trained on.
            None: no heads, or unknown (evaluation then uses 2, the papers' β).
        sync_batchnorm: synchronized BatchNorm (Keras' `BatchNormalization(
            synchronized=True)`) in every BatchNorm layer of the model, inserted layers
            included: under a distribution strategy the batch mean and variance are
            all-reduced over the replicas (the global batch's statistics, as on one
            device); without one it is plain BatchNorm. Default False: each replica
            normalizes with its own slice's statistics. Saved in the config.

    Input shape: `(batch, height, width, channels)`, float32 in [0, 1].
    Output shape: `(batch, num_classes)` logits.
    """

    def __init__(self, num_classes, mean=(0.0,), std=(1.0,), inserts=None, aux_weight=None,
                 sync_batchnorm=False, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"Expected `num_classes` >= 2. Received: num_classes={num_classes}")
        self.num_classes = int(num_classes)
        try:  # a scalar is one value for every channel
            self.mean = tuple(float(m) for m in np.atleast_1d(mean))
            self.std = tuple(float(s) for s in np.atleast_1d(std))
        except (TypeError, ValueError):
            raise ValueError(f"Expected numbers (one per channel, or one for all) as `mean` "
                             f"and `std`. Received: mean={mean!r}, std={std!r}") from None
        self.aux_weight = None if aux_weight is None else float(aux_weight)
        self.sync_batchnorm = bool(sync_batchnorm)
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(
                f"Expected `mean` and `std` of equal length with std > 0. "
                f"Received: mean={self.mean}, std={self.std}")
        self.normalizer = Standardize(self.mean, self.std, name="normalize")
        self.inserts = {}
        given = {point: keras.saving.deserialize_keras_object(layer)
                 if isinstance(layer, dict) else layer
                 for point, layer in (inserts or {}).items()}
        # Tracked only by `_check_inserts`, which each subclass calls after making its own
        # layers: the variable order (which a saved optimizer state follows) is then the
        # same as when AdversarialModel inserts them into a classifier built without.
        object.__setattr__(self, "_given_inserts", given)
        self.neck = None

    @property
    def points(self):
        """Names of the insertion points, in the order the forward pass reaches them."""
        return tuple(self.block_names) + (PENULTIMATE,)

    def _check_inserts(self):
        if self._given_inserts:
            self.inserts.update(self._given_inserts)
            object.__setattr__(self, "_given_inserts", {})
        unknown = sorted(set(self.inserts) - set(self.points))
        if unknown:
            raise ValueError(
                f"Unknown insertion point(s) {unknown} for {type(self).__name__}. "
                f"Expected one of: {', '.join(self.points)}")

    def _insert(self, point, h, labels, training, aux, relax=None):
        layer = self.inserts.get(point)
        if layer is None:
            return h
        extra = {"relax": relax} if relax is not None and getattr(layer, "relaxable",
                                                                  False) else {}
        out = layer(h, labels=labels, training=training, **extra)
        if isinstance(out, (tuple, list)):
            h, extra = out
            aux.append(extra)
            return h
        return out

    def feature_map(self, x, training=False, labels=None, relax_masks=None):
        """The penultimate feature map (after any layer inserted there) and aux logits."""
        aux = []
        h = self.stem(self.normalizer(x), training=training)
        for point, block in zip(self.block_names, self.blocks):
            h = self._insert(point, block(h, training=training), labels, training, aux,
                             relax_masks)
        if self.neck is not None:
            h = self.neck(h, training=training)
        h = self._insert(PENULTIMATE, h, labels, training, aux, relax_masks)
        return h, aux

    def forward(self, x, training=False, labels=None, relax_masks=None):
        """Returns `{"logits", "aux_logits": [...], "features": pooled penultimate features}`.

        `relax_masks=T` (attacks only) gives the inserted mask layers' argmax choice the
        gradient of a softmax at temperature T, values unchanged (`ClassChannelMask.mask`).
        """
        if not self.built:  # defenses call forward() directly, not through __call__
            self.build(tuple(x.shape))
        h, aux = self.feature_map(x, training=training, labels=labels,
                                  relax_masks=relax_masks)
        features = self.pool(h, training=training)
        return {"logits": self.fc(features), "aux_logits": aux, "features": features}

    def call(self, x, training=False, labels=None):
        return self.forward(x, training=training, labels=labels)["logits"]

    def build(self, input_shape):
        self._check_inserts()
        self.built = True  # set first: the forward pass below must not build again
        try:
            self.forward(ops.zeros((1,) + tuple(input_shape[1:])))
        except Exception:
            self.built = False
            raise
        # Blocks make their BatchNorm layers when built, so they are all here now;
        # Keras reads `synchronized` at each call.
        for layer in self._flatten_layers(include_self=False):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = self.sync_batchnorm

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            inserts={p: keras.saving.serialize_keras_object(l) for p, l in self.inserts.items()},
            aux_weight=self.aux_weight,
            sync_batchnorm=self.sync_batchnorm,
        )
        return config
