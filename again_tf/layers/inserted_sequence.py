"""Several inserted layers at one insertion point, run one after the other."""

import keras


@keras.saving.register_keras_serializable(package="again_tf")
class InsertedSequence(keras.layers.Layer):
    """Runs inserted layers in order at one insertion point of a `Classifier`.

    Each layer is called `layer(h, labels=labels, training=training)` and returns the
    new feature map or `(feature map, aux logits)`; at most one of them may return
    auxiliary logits (a `Classifier` collects one per point), and the sequence returns
    them with the last feature map. AGAIN uses it for HFF followed by ASE.

    Args:
        layers: the layers, in call order (Keras layers or their serialized configs).

    Input shape: that of the first layer. Output shape: that of the last, and the
    auxiliary logits if a layer makes them.

    Example:
        point = InsertedSequence([HybridFeatureFusion(), AttributionSpanEnlargement(10)])
        model = again_tf.models.SmallCNN(10, inserts={"stage1": point})
    """

    def __init__(self, layers, **kwargs):
        super().__init__(**kwargs)
        if not layers:
            raise ValueError("Expected at least one layer. Received: layers=[]")
        self.inner = [keras.saving.deserialize_keras_object(l) if isinstance(l, dict) else l
                      for l in layers]

    @property
    def needs_partner(self):
        """True if any inner layer needs a partner batch (see `HybridFeatureFusion`)."""
        return any(getattr(l, "needs_partner", False) for l in self.inner)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.inner:
            if not layer.built:  # deserialized inner layers arrive built
                layer.build(shape)
            out = layer.compute_output_shape(shape)
            shape = tuple(out[0]) if isinstance(out[0], (tuple, list)) else tuple(out)

    @property
    def relaxable(self):
        """True if an inner layer takes `relax` (see `ClassChannelMask.mask`)."""
        return any(getattr(l, "relaxable", False) for l in self.inner)

    def call(self, inputs, labels=None, training=None, relax=None):
        h, aux = inputs, None
        for layer in self.inner:
            extra = {"relax": relax} if relax is not None and getattr(layer, "relaxable",
                                                                      False) else {}
            out = layer(h, labels=labels, training=training, **extra)
            if isinstance(out, (tuple, list)):
                if aux is not None:
                    raise ValueError(f"InsertedSequence {self.name!r}: more than one layer "
                                     f"returns auxiliary logits ({layer.name!r} is the second)")
                h, aux = out
            else:
                h = out
        return h if aux is None else (h, aux)

    def get_config(self):
        return {**super().get_config(),
                "layers": [keras.saving.serialize_keras_object(l) for l in self.inner]}
