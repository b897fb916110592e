"""Layers inserted into classifiers by defenses: label-conditioned channel masks and friends.

Each is called `layer(h, labels=labels, training=training)` at an insertion point of an
`again_tf.models.Classifier` and returns the new feature map, or `(feature map, aux
logits)`:

    ChannelActivationSuppressing   CAS (Bai et al., ICLR 2021)
    AttributionSpanEnlargement     ASE, AGAIN (Yin et al., CVPR 2023)
    HybridFeatureFusion            HFF, AGAIN (Yin et al., CVPR 2023)
    ChannelImportanceFeatureSelection  CIFS (Yan et al., ICML 2021)
    ClassChannelMask               the shared base of CAS and ASE
    InsertedSequence               several layers at one point (HFF then ASE)
"""

from again_tf.layers.attribution_span_enlargement import AttributionSpanEnlargement
from again_tf.layers.channel_activation_suppressing import ChannelActivationSuppressing
from again_tf.layers.channel_importance_selection import ChannelImportanceFeatureSelection
from again_tf.layers.channel_mask import ClassChannelMask
from again_tf.layers.hybrid_feature_fusion import HybridFeatureFusion
from again_tf.layers.inserted_sequence import InsertedSequence

__all__ = [
    "AttributionSpanEnlargement", "ChannelActivationSuppressing",
    "ChannelImportanceFeatureSelection", "ClassChannelMask", "HybridFeatureFusion",
    "InsertedSequence",
]
