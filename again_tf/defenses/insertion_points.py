"""Where the feature-layer defenses (AGAIN, CAS, CIFS) insert their layers.

The official code of all three puts its two layers in the network's last stage: on
the activated input of the last block and on the last feature map (for ResNet-18 the
post-ReLU outputs of both blocks of the last stage; for the pre-activation WRN inside
the last block, after its BN-ReLU, and after the final BN-ReLU). With insertion
points after whole blocks, `default_points` takes the output of the second-to-last
block (the last block's input) when it belongs to the last stage, and `"penultimate"`:

    ResNet-18 / PreAct ResNet-18   stage4.block0, penultimate
    WRN-34-10                      stage3.block3, penultimate
    SmallCNN                       penultimate (the map after stage2)

For ResNet-18 these are exactly the official CAS/CIFS places. For the pre-activation
nets the first layer also scales the last block's shortcut and feeds its BN-ReLU,
where the official code masks after that BN-ReLU and leaves the shortcut alone.

The last stage matters: at inference every mask is chosen by its own auxiliary head,
and the network, trained on label-chosen masks, follows that choice, so a mask in an
early stage, whose pooled-linear head is weak, caps the whole model's accuracy at that
head's (the SmallCNN with a mask after `stage1` reached 45% clean accuracy on
Fashion-MNIST after one epoch, 99% on its label-masked training batches). The
SmallCNN's two stages leave it only the last map.
"""

from again_tf.models.base import PENULTIMATE, Classifier


def parse_points(points):
    """None, a sequence of names, or one string of names joined by "+" (CLI form)."""
    if points is None:
        return None
    if isinstance(points, str):
        points = [p for p in points.replace(" ", "+").split("+") if p]
    points = tuple(str(p) for p in points)
    if not points:
        raise ValueError("Expected `points` None or at least one insertion point. "
                         "Received: points=()")
    return points


def stage(point):
    """The stage a block name belongs to: "stage4" for "stage4.block0" and for "stage4"."""
    return point.split(".")[0]


def default_points(model):
    """The last block's input if in the last stage, and the penultimate map (module doc)."""
    blocks = tuple(model.block_names)
    if len(blocks) >= 2 and stage(blocks[-2]) == stage(blocks[-1]):
        return (blocks[-2], PENULTIMATE)
    return (PENULTIMATE,)


def resolve(modifier, model, points):
    """The points to use for `model`, in forward order; one-line errors for bad input."""
    if not isinstance(model, Classifier):
        raise ValueError(f"Modifier {modifier!r} inserts layers, which needs an "
                         f"again_tf.models.Classifier; received a {type(model).__name__}")
    points = points or default_points(model)
    unknown = [p for p in points if p not in model.points]
    if unknown:
        raise ValueError(f"Modifier {modifier!r}: unknown insertion point(s) {unknown} for "
                         f"{type(model).__name__}. Expected some of: {', '.join(model.points)}")
    if len(set(points)) != len(points):
        raise ValueError(f"Modifier {modifier!r}: repeated insertion point in points={points}")
    return tuple(sorted(points, key=model.points.index))


def layer_name(prefix, point):
    return f"{prefix}_{point.replace('.', '_')}"
