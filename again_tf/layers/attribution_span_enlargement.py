"""Attribution Span Enlargement (ASE), the channel mask of AGAIN (Yin et al., CVPR 2023)."""

import keras
from keras import ops

from again_tf.layers.channel_mask import ClassChannelMask


@keras.saving.register_keras_serializable(package="again_tf")
class AttributionSpanEnlargement(ClassChannelMask):
    """Masks channels with a mix of the true class's and another class's kernel column.

    Yin et al., "AGAIN: Adversarial Training with Attribution Span Enlargement and
    Hybrid Feature Fusion", CVPR 2023: Â = α·A·W^y + (1 − α)·A·W^{y'}. With the
    auxiliary head `GAP(h) @ W + b`:

        training (labels given):   h̃ = h ⊙ (α·W[:, y] + (1 − α)·W[:, y'])
        inference / attack:        h̃ = h ⊙ W[:, argmax(GAP(h) @ W + b)]

    where `y'` is the label of the example a random permutation of the batch puts in
    this example's place (`fake_label = label[torch.randperm(N)]` in the official code,
    github.com/InsLin/AGAIN: it may be the example's own label). The permutation is
    drawn afresh at every call from the layer's `SeedGenerator`, also inside a compiled
    `train_step`.

    In the training attack the official code runs the model under `model.eval()` and
    without labels, so the attack sees the inference mask (predicted class); this
    layer does the same whenever `training` is False, labels or not. The auxiliary
    logits are computed before masking and trained with cross-entropy (`head_loss`,
    weight β = 2 in the official code).

    Args:
        num_classes: number of classes of the auxiliary head.
        alpha: α, the weight of the true class's column. Default 0.6 (official code).
        seed: seed of the permutation's `SeedGenerator`. Default None.

    Input shape: `(batch, ..., channels)`.
    Output shape: the input's, and `(batch, num_classes)` auxiliary logits.

    Example:
        ase = AttributionSpanEnlargement(10)
        h, aux = ase(features, labels=y, training=True)
    """

    def __init__(self, num_classes, alpha=0.6, seed=None, **kwargs):
        super().__init__(num_classes, **kwargs)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"Expected `alpha` in [0, 1]. Received: alpha={alpha}")
        self.alpha = float(alpha)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")

    def other_labels(self, labels):
        """y': the labels of a random permutation of the batch."""
        order = keras.random.shuffle(ops.arange(ops.shape(labels)[0]), seed=self.seed_generator)
        return ops.take(labels, order, axis=0)

    def training_mask(self, labels):
        labels = ops.cast(labels, "int32")
        return (self.alpha * self.class_masks(labels)
                + (1.0 - self.alpha) * self.class_masks(self.other_labels(labels)))

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "seed": self.seed}
