"""Tests of again_tf.models: shapes, insertion points, normalization, saving, export."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from again_tf import models
from again_tf.models import forward

NUM_CLASSES = 5
CALLS = []  # (layer name, labels, feature-map shape) of every ScaleWithAuxHead call


@keras.saving.register_keras_serializable(package="again_tf_tests")
class ScaleWithAuxHead(keras.layers.Layer):
    """Scales a feature map by a learned per-channel vector and adds an auxiliary head."""

    def __init__(self, aux_classes, **kwargs):
        super().__init__(**kwargs)
        self.aux_classes = aux_classes

    def build(self, input_shape):
        channels = input_shape[-1]
        self.scale = self.add_weight(shape=(channels,), name="scale",
                                     initializer=keras.initializers.RandomUniform(0.5, 1.5))
        self.kernel = self.add_weight(shape=(channels, self.aux_classes), name="kernel",
                                      initializer="glorot_uniform")

    def call(self, h, labels=None, training=None):
        CALLS.append((self.name, labels, tuple(h.shape)))
        h = h * self.scale
        return h, ops.matmul(ops.mean(h, axis=(1, 2)), self.kernel)

    def get_config(self):
        config = super().get_config()
        config.update(aux_classes=self.aux_classes)
        return config


def resnet_points(stages, blocks):
    return tuple(f"stage{s}.block{b}" for s in range(1, stages + 1) for b in range(blocks)) + (
        "penultimate",)


# name -> (constructor of a small instance, input shape, feature size, insertion points)
ARCHS = {
    "small_cnn": (lambda **kw: models.SmallCNN(NUM_CLASSES, width=4, hidden=16, **kw),
                  (8, 8, 1), 16, ("stage1", "stage2", "penultimate")),
    "resnet18": (lambda **kw: models.ResNet18(NUM_CLASSES, **kw), (8, 8, 3), 512,
                 resnet_points(4, 2)),
    "preact_resnet18": (lambda **kw: models.PreActResNet18(NUM_CLASSES, **kw), (8, 8, 3), 512,
                        resnet_points(4, 2)),
    "wrn10_1": (lambda **kw: models.WideResNet(10, 1, num_classes=NUM_CLASSES, **kw),
                (8, 8, 3), 64, resnet_points(3, 1)),
}


def images(shape, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch,) + shape).astype("float32")


def built(arch, **kwargs):
    make, shape, _, _ = ARCHS[arch]
    model = make(**kwargs)
    model.build((None,) + shape)
    return model, images(shape)


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shapes_and_points(arch):
    model, x = built(arch)
    _, _, features, points = ARCHS[arch]
    assert model.points == points
    assert model(x).shape == (2, NUM_CLASSES)
    out = forward(model, x)
    assert out["logits"].shape == (2, NUM_CLASSES)
    assert out["features"].shape == (2, features)
    assert out["aux_logits"] == []


def test_deeper_wide_resnet_points_and_build_names():
    assert models.WideResNet(16, 1).points == resnet_points(3, 2)
    assert models.MODELS == ("small_cnn", "resnet18", "preact_resnet18", "wrn34_10")
    for name, cls in [("small_cnn", models.SmallCNN), ("resnet18", models.ResNet18),
                      ("preact_resnet18", models.PreActResNet18),
                      ("wrn34_10", models.WideResNet)]:
        model = models.build(name, 10)
        assert type(model) is cls and not model.built
    wrn = models.build("wrn", 7, depth=16, widen_factor=2, dropout=0.3)
    assert (wrn.depth, wrn.widen_factor, wrn.dropout, wrn.num_classes) == (16, 2, 0.3, 7)
    big = models.build("wrn34_10", 10)
    assert (big.depth, big.widen_factor) == (34, 10)


def test_forward_of_a_plain_keras_model():
    plain = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    out = forward(plain, images((4, 4, 1)))
    assert out["logits"].shape == (2, 3)
    assert out["aux_logits"] == [] and out["features"] is None


@pytest.mark.parametrize("arch,mean,std", [
    ("small_cnn", (0.3,), (0.4,)),
    ("wrn10_1", (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
    ("wrn10_1", (0.5,), (0.2,)),  # one value broadcast over three channels
])
def test_normalization_is_inside_the_model(arch, mean, std):
    model, x = built(arch, mean=mean, std=std)
    plain, _ = built(arch)
    plain.set_weights(model.get_weights())
    expected = plain((x - np.asarray(mean, "float32")) / np.asarray(std, "float32"))
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_mean_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="mean"):
        built("wrn10_1", mean=(0.1, 0.2), std=(1.0, 1.0))


def test_inserted_layers_get_labels_and_return_aux_logits_in_point_order():
    # Given in the reverse of the order the forward pass reaches them.
    inserts = {"penultimate": ScaleWithAuxHead(3, name="pen"),
               "stage4.block1": ScaleWithAuxHead(4, name="s4")}
    model, x = built("resnet18", inserts=inserts)
    y = np.array([1, 3])
    CALLS.clear()
    out = forward(model, x, training=True, labels=y)
    assert [a.shape for a in out["aux_logits"]] == [(2, 4), (2, 3)]
    assert [c[0] for c in CALLS] == ["s4", "pen"]
    for _, labels, shape in CALLS:
        np.testing.assert_array_equal(labels, y)
        assert shape == (2, 1, 1, 512)  # 8x8 input: 8, 8, 4, 2, 1

    CALLS.clear()
    model(x)  # the inference path: no labels
    assert [(c[0], c[1]) for c in CALLS] == [("s4", None), ("pen", None)]

    # The feature map the inserted layer returns is the one the head sees.
    inserts["penultimate"].scale.assign(np.zeros(512, "float32"))
    np.testing.assert_allclose(model(x), np.tile(model.fc.bias.numpy(), (2, 1)), atol=1e-6)


def test_inserted_layer_after_a_small_cnn_stage():
    model, x = built("small_cnn", inserts={"stage1": ScaleWithAuxHead(2, name="s1")})
    CALLS.clear()
    out = model.forward(x, labels=np.array([0, 1]))
    assert [c[2] for c in CALLS] == [(2, 4, 4, 4)]
    assert len(out["aux_logits"]) == 1 and out["aux_logits"][0].shape == (2, 2)


def test_unknown_insertion_point_and_model_name():
    valid = "stage5.block0.*stage1.block0.*stage4.block1, penultimate"
    with pytest.raises(ValueError, match=valid):
        models.ResNet18(10, inserts={"stage5.block0": ScaleWithAuxHead(2)})
    with pytest.raises(ValueError, match="stage1, stage2, penultimate"):
        models.build("small_cnn", 10, inserts={"stage3": ScaleWithAuxHead(2)})
    names = "resnet50.*small_cnn, resnet18, preact_resnet18, wrn34_10"
    with pytest.raises(ValueError, match=names):
        models.build("resnet50", 10)
    with pytest.raises(ValueError, match=r"depth.*\(depth - 4\) % 6 == 0.*depth=33"):
        models.WideResNet(depth=33)
    with pytest.raises(ValueError, match="depth=28"):
        models.build("wrn34_10", 10, depth=28)
    with pytest.raises(ValueError, match="num_classes=1"):
        models.SmallCNN(1)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("arch,point", [
    ("small_cnn", "stage2"), ("resnet18", "stage2.block0"), ("wrn10_1", "penultimate")])
def test_keras_file_round_trip(arch, point, tmp_path):
    model, x = built(arch, inserts={point: ScaleWithAuxHead(3)})
    model(images(x.shape[1:], batch=8, seed=1), training=True)  # move the BN statistics
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model) and loaded.points == model.points
    assert isinstance(loaded.inserts[point], ScaleWithAuxHead)
    before, after = model.forward(x), loaded.forward(x)
    np.testing.assert_allclose(after["logits"], before["logits"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after["aux_logits"][0], before["aux_logits"][0], atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_config_round_trip(arch):
    model = ARCHS[arch][0](mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1),
                           inserts={"penultimate": ScaleWithAuxHead(3)})
    config = model.get_config()
    params = set(inspect.signature(type(model).__init__).parameters) - {"self", "kwargs"}
    params |= {"aux_weight", "sync_batchnorm"}  # Classifier's, passed on through **kwargs
    assert params <= set(config)
    assert set(config) - params <= {"name", "trainable", "dtype"}
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    assert clone.points == model.points
    assert isinstance(clone.inserts["penultimate"], ScaleWithAuxHead)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert type(again) is type(model) and again.get_config() == config


def test_synchronized_batchnorm_is_a_saved_classifier_argument(tmp_path):
    """`sync_batchnorm=True` reaches every BatchNorm layer, those the blocks make when
    built included, and comes back with the saved model; the default stays per-replica."""
    def batchnorms(model):
        return [layer for layer in model._flatten_layers()
                if isinstance(layer, keras.layers.BatchNormalization)]

    plain, x = built("resnet18")
    assert batchnorms(plain) and not any(bn.synchronized for bn in batchnorms(plain))
    synced = models.build("resnet18", 10, width=4, sync_batchnorm=True)
    synced.build((None,) + tuple(x.shape[1:]))
    assert len(batchnorms(synced)) == len(batchnorms(plain))
    assert all(bn.synchronized for bn in batchnorms(synced))
    path = str(tmp_path / "synced.keras")
    synced.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.sync_batchnorm and all(bn.synchronized for bn in batchnorms(loaded))


@pytest.mark.parametrize("block", [
    models.BasicBlock(6, strides=2), models.PreActBlock(6, strides=2),
    models.WideBasicBlock(6, strides=2, dropout=0.3), models.ConvStage(6)])
def test_blocks_on_odd_sizes_and_their_configs(block):
    x = images((7, 7, 3))
    y = block(x, training=True)
    expected = (2, 3, 3, 6) if isinstance(block, models.ConvStage) else (2, 4, 4, 6)
    assert y.shape == expected
    assert tuple(block.compute_output_shape((None, 7, 7, 3)))[1:] == expected[1:]
    clone = type(block).from_config(block.get_config())
    assert clone.get_config() == block.get_config()
    assert clone(x).shape == expected
    assert len(clone.weights) == len(block.weights)


def test_strided_pointwise_conv_is_the_strided_conv():
    """The same function, kernel and output shape as `Conv2D(filters, 1, strides=s)`, for
    even and odd sizes; kept in its config."""
    from again_tf.models.resnet import StridedPointwiseConv2D

    for size, stride in ((8, 2), (7, 2), (7, 3)):
        x = images((size, size, 3))
        layer = StridedPointwiseConv2D(5, subsample=stride, use_bias=False)
        strided = keras.layers.Conv2D(5, 1, strides=stride, padding="valid", use_bias=False)
        y = layer(x)
        strided.build(x.shape)
        strided.set_weights(layer.get_weights())
        assert y.shape == strided(x).shape == (2, -(-size // stride), -(-size // stride), 5)
        np.testing.assert_allclose(y, strided(x), rtol=1e-5, atol=1e-6)
        assert tuple(layer.compute_output_shape((None, size, size, 3))) == (None,) + y.shape[1:]
        clone = StridedPointwiseConv2D.from_config(layer.get_config())
        assert clone.subsample == stride and clone.strides == (1, 1)
    with pytest.raises(ValueError, match="subsample"):
        StridedPointwiseConv2D(5, subsample=0)


def test_files_saved_with_strided_conv_shortcuts_load_into_the_new_layers(tmp_path,
                                                                           monkeypatch):
    """Models saved before the shortcuts became StridedPointwiseConv2D (a strided Conv2D,
    rebuilt here by swapping `conv2d` back) load with the same outputs."""
    from again_tf.models import resnet

    def old_conv2d(filters, kernel_size=3, strides=1, name=None):
        return keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding="same" if strides == 1 else "valid",
            use_bias=False, kernel_initializer="he_normal", name=name)

    x = images((28, 28, 1), batch=4)
    saved = {}
    with monkeypatch.context() as patch:
        for module in ("resnet", "preact_resnet", "wide_resnet"):
            patch.setattr(f"again_tf.models.{module}.conv2d", old_conv2d)
        for name, kwargs in (("resnet18", {"width": 4}), ("preact_resnet18", {"width": 4}),
                             ("wrn", {"depth": 10, "widen_factor": 1})):
            keras.utils.set_random_seed(0)
            model = models.build(name, 10, **kwargs)
            model.build((None, 28, 28, 1))
            assert not any(isinstance(layer, resnet.StridedPointwiseConv2D)
                           for layer in model._flatten_layers())
            model.save(tmp_path / f"{name}.keras")
            saved[name] = np.asarray(model(x, training=False))
    for name, expected in saved.items():
        loaded = keras.saving.load_model(tmp_path / f"{name}.keras")
        assert any(isinstance(layer, resnet.StridedPointwiseConv2D)
                   for layer in loaded._flatten_layers()), name
        np.testing.assert_allclose(loaded(x, training=False), expected, rtol=1e-5, atol=1e-6)


# In a fresh process whose oneDNN may use AVX2 code only (what a CPU without AVX-512 runs)
# and one intra-op thread: the gradient of every block's strided 1x1 shortcut kernel, on 4
# input channels, against NumPy. oneDNN's strided 1x1 weight gradient gets it wrong there
# (or corrupts the heap); see StridedPointwiseConv2D.
AVX2_SHORTCUTS = """
import os
os.environ.update(ONEDNN_MAX_CPU_ISA="AVX2", TF_NUM_INTRAOP_THREADS="1",
                  TF_CPP_MIN_LOG_LEVEL="3")
import numpy as np, tensorflow as tf
from again_tf import models
rng = np.random.default_rng(0)
for block in (models.BasicBlock(8, strides=2), models.PreActBlock(8, strides=2),
              models.WideBasicBlock(8, strides=2)):
    block.build((None, 28, 28, 4))
    shortcut = getattr(block, "shortcut", None) or block.shortcut_conv
    for _ in range(5):
        x = rng.normal(size=(8, 28, 28, 4)).astype(np.float32)
        with tf.GradientTape() as tape:
            y = shortcut(tf.constant(x))
            loss = tf.reduce_sum(y * y)
        got = tape.gradient(loss, shortcut.kernel).numpy()[0, 0]
        want = np.einsum("nijc,nijo->co", x[:, ::2, ::2].astype(np.float64),
                         2 * y.numpy().astype(np.float64))
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < 1e-5, (type(block).__name__, error)
print("ok")
"""


def test_shortcut_kernel_gradients_are_right_on_avx2_code():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", AVX2_SHORTCUTS], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_users_strided_pointwise_conv_on_few_channels_is_warned_about(tmp_path, monkeypatch):
    """AdversarialModel warns for a model of the user's own that would take oneDNN's faulty
    gradient on this CPU (read from a cpuinfo file here), and only then."""
    import warnings

    from again_tf import onednn
    from again_tf.defenses import AdversarialModel

    def net(first):
        return keras.Sequential([keras.Input((8, 8, 3)), first, keras.layers.Flatten(),
                                 keras.layers.Dense(3)])

    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text("processor : 0\nflags : fpu sse4_2 avx avx2 fma\n")
    avx512.write_text("flags : avx2 avx512f avx512dq avx512bw avx512vl\n")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert onednn.takes_avx2_code(str(avx2)) is True
    assert onednn.takes_avx2_code(str(avx512)) is False
    assert onednn.takes_avx2_code(str(tmp_path / "missing")) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert onednn.takes_avx2_code(str(avx512)) is True
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert onednn.takes_avx2_code(str(avx2)) is False
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")

    faulty = net(keras.layers.Conv2D(4, 1, strides=2, name="down"))
    assert onednn.affected_layers(faulty) == ["down"]
    with pytest.warns(UserWarning, match="down: 1x1 convolution.*StridedPointwiseConv2D"):
        onednn.check_model(faulty, str(avx2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onednn.check_model(faulty, str(avx512))
        for fine in (keras.layers.Conv2D(4, 1, strides=1), keras.layers.Conv2D(4, 3, strides=2),
                     models.StridedPointwiseConv2D(4, subsample=2)):
            assert onednn.affected_layers(net(fine)) == []
        wide = keras.Sequential([keras.Input((8, 8, 8)), keras.layers.Conv2D(4, 1, strides=2)])
        assert onednn.affected_layers(wide) == []  # 8 channels: a full block of AVX2 code
        # Every network of again_tf.models, at widths under 8 too.
        for name, kwargs in (("preact_resnet18", {"width": 4}), ("resnet18", {"width": 2}),
                             ("wrn", {"depth": 10, "widen_factor": 1})):
            model = models.build(name, 10, **kwargs)
            model.build((None, 28, 28, 1))
            assert onednn.affected_layers(model) == [], name
    monkeypatch.setattr(onednn, "takes_avx2_code", lambda cpuinfo=None: True)
    with pytest.warns(UserWarning, match="down: 1x1 convolution"):
        AdversarialModel(net(keras.layers.Conv2D(4, 1, strides=2, name="down")),
                         defense="pgd_at", eps=0.1).build((None, 8, 8, 3))


def test_batchnorm_statistics_move_only_in_training():
    model, x = built("small_cnn")
    stats = lambda: [v.numpy().copy() for v in model.non_trainable_variables]  # noqa: E731
    assert len(stats()) == 8  # moving mean and variance of four BatchNorms
    start = stats()
    model(x, training=False)
    forward(model, x, training=False)
    for a, b in zip(start, stats()):
        np.testing.assert_array_equal(a, b)
    model(x, training=True)
    assert all(not np.allclose(a, b) for a, b in zip(start, stats()))


def test_model_first_built_in_a_graph_runs_eagerly():
    model = ARCHS["small_cnn"][0](mean=(0.5,), std=(0.25,))
    x = images((8, 8, 1))
    graph_logits = tf.function(lambda t: model(t))(tf.constant(x))
    np.testing.assert_allclose(model(x), graph_logits, atol=1e-6)


def test_export_serves_the_same_logits(tmp_path):
    model = models.SmallCNN(10, width=4, hidden=16, mean=(0.29,), std=(0.35,))
    model.build((None, 28, 28, 1))
    x = images((28, 28, 1), batch=3)
    path = str(tmp_path / "exported")
    model.export(path, input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)],
                 verbose=False)
    reloaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
    served = reloaded.serve(tf.constant(x))
    np.testing.assert_allclose(served, model(x), rtol=1e-5, atol=1e-5)


def trainable_count(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def test_parameter_counts_match_the_pytorch_models():
    counts = {}
    for name, shape in [("small_cnn", (28, 28, 1)), ("resnet18", (8, 8, 3)),
                        ("preact_resnet18", (8, 8, 3)), ("wrn34_10", (8, 8, 3))]:
        model = models.build(name, 10)
        model.build((None,) + shape)
        counts[name] = trainable_count(model)
    assert counts == {
        "small_cnn": 734_794,
        "resnet18": 11_173_962,        # kuangliu/pytorch-cifar ResNet18
        "preact_resnet18": 11_172_170,  # Bag-of-tricks/AWP PreActResNet18 (with final bn)
        "wrn34_10": 46_160_474,         # TRADES/AWP WideResNet(34, 10)
    }


# ------------------------------------------- the default model for 28x28 data


def test_narrow_preact_resnet18_is_the_papers_shape_at_width_8():
    """PreAct ResNet-18 at width 8: four stages of two blocks (8, 16, 32, 64 channels,
    28 -> 28 -> 14 -> 7 -> 4), GAP and one Dense head, the ResNet-18 insertion points."""
    model = models.build("preact_resnet18", 10, width=8, mean=(0.286,), std=(0.353,))
    model.build((None, 28, 28, 1))
    assert model.points == resnet_points(4, 2)
    x = images((28, 28, 1))
    h = model.stem(model.normalizer(x))
    shapes = []
    for block in model.blocks:
        h = block(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(28, 28, 8)] * 2 + [(14, 14, 16)] * 2 + [(7, 7, 32)] * 2 + [(4, 4, 64)] * 2
    assert forward(model, x)["features"].shape == (2, 64)
    # 1/8 of the width: about 1/64 of ResNet-18's 11.2M weights.
    assert trainable_count(model) == 176_034  # counted by hand, layer by layer
    clone = models.PreActResNet18.from_config(model.get_config())
    assert clone.width == 8 and clone.get_config()["width"] == 8
    with pytest.raises(ValueError, match="width"):
        models.PreActResNet18(10, width=0)
    with pytest.raises(ValueError, match="width"):
        models.ResNet18(10, width=2.5)


@pytest.mark.parametrize("defense", ["again_pgd", "cas"])
def test_default_model_with_inserted_layers_saves_reloads_and_exports(defense, tmp_path):
    from again_tf.defenses import AdversarialModel
    from helpers import served_in_fresh_process

    keras.utils.set_random_seed(0)
    net = models.build("preact_resnet18", 10, width=4)
    adv = AdversarialModel(net, defense=defense, eps=0.1, step_size=0.05, steps=1,
                           eval_steps=0)
    # Eager steps: what is saved is the layers and their state, not a trace (the default
    # model's compiled AGAIN step runs in test_training's end-to-end train.py run).
    adv.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
    x = images((28, 28, 1), batch=16)
    adv.fit(x, np.arange(16) % 10, batch_size=8, epochs=1, verbose=0)
    assert sorted(net.inserts) == ["penultimate", "stage4.block0"]
    expected = np.asarray(net(x, training=False))
    path = str(tmp_path / "net.keras")
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert sorted(loaded.inserts) == sorted(net.inserts) and loaded.width == 4
    np.testing.assert_allclose(loaded(x, training=False), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(served_in_fresh_process(net, x, tmp_path), expected,
                               rtol=1e-5, atol=1e-5)
