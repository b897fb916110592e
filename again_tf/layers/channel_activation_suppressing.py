"""Channel-wise Activation Suppressing (CAS), Bai et al., ICLR 2021."""

import keras

from again_tf.layers.channel_mask import ClassChannelMask


@keras.saving.register_keras_serializable(package="again_tf")
class ChannelActivationSuppressing(ClassChannelMask):
    """Reweights channels by the class column of an auxiliary head's kernel (CAS).

    Bai et al., "Improving Adversarial Robustness via Channel-wise Activation
    Suppressing", ICLR 2021. With `p = GAP(h)` and the auxiliary head `p @ W + b`:

        training (labels given):   h̃ = h ⊙ W[:, y]
        inference / attack:        h̃ = h ⊙ W[:, argmax(p @ W + b)]

    and the auxiliary logits are trained with cross-entropy next to the main head
    (`head_loss`, weight β = 2 in the paper). The official code
    (github.com/bymavis/CAS_ICLR2021) applies CAS to the post-ReLU outputs of both
    blocks of ResNet-18's last stage, and picks the mask by `model.training`: the
    training attack, run under `model.eval()`, uses the predicted class — so does this
    layer whenever `training` is False, labels or not.

    Args:
        num_classes: number of classes of the auxiliary head.

    Input shape: `(batch, ..., channels)`.
    Output shape: the input's, and `(batch, num_classes)` auxiliary logits.

    Example:
        model = again_tf.models.ResNet18(10, inserts={
            "stage4.block0": ChannelActivationSuppressing(10),
            "stage4.block1": ChannelActivationSuppressing(10)})
    """
