"""Datasets: metadata, loading from local files or tensorflow-datasets, input pipelines.

Five image-classification datasets are supported (`DATASETS`). Each has a `DatasetInfo`
with its shape, classes, normalization statistics and the usual L-inf attack budget:

    images, labels = again_tf.data.load_arrays("cifar10", "train[:45000]", data_dir="~/data")
    ds, ds_info = again_tf.data.load("cifar10", "train[:45000]", data_dir="~/data")
    train = again_tf.data.pipeline(ds, 128, training=True, augment=ds_info.augment, seed=0)
    # Epochs 3..9 exactly as an uninterrupted run sees them (for resuming):
    rest = again_tf.data.training_epochs(ds, 128, seed=0, epochs=10, first_epoch=3)

Data is looked for, in this order:

1. under `data_dir`, in the dataset's standard distribution format (the idx files of
   MNIST and Fashion-MNIST, the binary or python versions of CIFAR-10/100, the
   `*_32x32.mat` files of SVHN cropped digits), directly or in a subfolder named after
   the dataset;
2. for Fashion-MNIST, Debian's `dataset-fashion-mnist` package (`DEBIAN_FASHION_MNIST`);
3. tensorflow-datasets, which finds a copy it prepared before under `data_dir` (or its
   default directory) or downloads one when online.

A local `data_dir` that does not exist is an error (FileNotFoundError), never a reason to
fall back to another copy. CIFAR python batches are read with an unpickler that builds
only NumPy arrays, lists, numbers and bytes: nothing in a data file is ever executed.

Images are uint8 NHWC arrays and labels int64 arrays; `load` turns images into float32
in [0, 1]. Decoded arrays are cached for the life of the process and are read-only.
"""

import dataclasses
import functools
import gzip
import io
import math
import os
import pickle
import re
import struct
import tarfile
import zlib

import numpy as np
import tensorflow as tf

from again_tf.catalog import DATASETS  # noqa: E402  (the names, kept free of TensorFlow)

AUGMENTATIONS = ("none", "crop_flip")

# Where Debian's `dataset-fashion-mnist` package puts the four idx.gz files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# Shuffle buffers cover the whole split up to this size (every MNIST/CIFAR training
# split); larger or unknown-size datasets get a buffer of this many examples.
MAX_SHUFFLE_BUFFER = 60000

# Zero padding, in pixels, of the "crop_flip" augmentation.
CROP_PADDING = 4


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset.

    Attributes:
        name: One of `DATASETS`.
        num_classes: Number of classes.
        shape: Image shape `(height, width, channels)`.
        class_names: One name per class, in label order.
        eps: The usual L-inf perturbation budget, in [0, 1] pixel units.
        step_size: The default PGD step size, in [0, 1] pixel units.
        mean: Per-channel pixel mean, in [0, 1] pixel units.
        std: Per-channel pixel standard deviation, in [0, 1] pixel units.
        augment: The usual training augmentation, one of `AUGMENTATIONS`.
        train_size: Number of examples in the full training split.
        test_size: Number of examples in the full test split.
    """

    name: str
    num_classes: int
    shape: tuple
    class_names: tuple
    eps: float
    step_size: float
    mean: tuple
    std: tuple
    augment: str
    train_size: int
    test_size: int


_DIGITS = tuple(str(d) for d in range(10))

_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle",
    "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can",
    "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud",
    "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant",
    "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree",
    "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea",
    "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe",
    "whale", "willow_tree", "wolf", "woman", "worm",
)

_INFOS = {
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist",
        num_classes=10,
        shape=(28, 28, 1),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                     "Shirt", "Sneaker", "Bag", "Ankle boot"),
        eps=0.1,
        step_size=0.1 / 4,
        mean=(0.2860,),
        std=(0.3530,),
        augment="none",
        train_size=60000,
        test_size=10000,
    ),
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        shape=(28, 28, 1),
        class_names=_DIGITS,
        eps=0.3,
        step_size=0.3 / 4,
        mean=(0.1307,),
        std=(0.3081,),
        augment="none",
        train_size=60000,
        test_size=10000,
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        shape=(32, 32, 3),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                     "horse", "ship", "truck"),
        eps=8 / 255,
        step_size=2 / 255,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2471, 0.2435, 0.2616),
        augment="crop_flip",
        train_size=50000,
        test_size=10000,
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        shape=(32, 32, 3),
        class_names=_CIFAR100_CLASSES,
        eps=8 / 255,
        step_size=2 / 255,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment="crop_flip",
        train_size=50000,
        test_size=10000,
    ),
    "svhn": DatasetInfo(
        name="svhn",
        num_classes=10,
        shape=(32, 32, 3),
        class_names=_DIGITS,
        eps=8 / 255,
        step_size=2 / 255,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        augment="crop_flip",
        train_size=73257,
        test_size=26032,
    ),
}

# tensorflow-datasets names, where they differ from ours.
_TFDS_NAMES = {"svhn": "svhn_cropped"}

# Other subfolder names under `data_dir` that commonly hold a dataset's files.
_FOLDER_ALIASES = {"svhn": ("svhn_cropped",)}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# CIFAR distributions, in order of preference: (format, extracted folder, tarball,
# member file names of each split).
_CIFAR_SOURCES = {
    "cifar10": (
        ("binary", "cifar-10-batches-bin", "cifar-10-binary.tar.gz",
         {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
          "test": ("test_batch.bin",)}),
        ("python", "cifar-10-batches-py", "cifar-10-python.tar.gz",
         {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
          "test": ("test_batch",)}),
    ),
    "cifar100": (
        ("binary", "cifar-100-binary", "cifar-100-binary.tar.gz",
         {"train": ("train.bin",), "test": ("test.bin",)}),
        ("python", "cifar-100-python", "cifar-100-python.tar.gz",
         {"train": ("train",), "test": ("test",)}),
    ),
}

_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}

_EXPECTED_FILES = {
    "fashion_mnist": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                     "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
    "mnist": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
             "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
    "cifar10": "cifar-10-binary.tar.gz (or its extracted cifar-10-batches-bin/) or "
               "cifar-10-python.tar.gz (or cifar-10-batches-py/)",
    "cifar100": "cifar-100-binary.tar.gz (or its extracted cifar-100-binary/) or "
                "cifar-100-python.tar.gz (or cifar-100-python/)",
    "svhn": "train_32x32.mat, test_32x32.mat",
}

_SPLIT_FORMS = ('"train", "test", or a slice of one such as "train[:50000]", '
                '"train[50000:]", "test[:1000]", "train[:10%]"')

_SPLIT_RE = re.compile(r"^(train|test)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def info(name):
    """Returns the `DatasetInfo` of a dataset.

    Args:
        name: One of `DATASETS`.

    Returns:
        The dataset's `DatasetInfo`.

    Raises:
        ValueError: if `name` is not one of `DATASETS`.
    """
    try:
        return _INFOS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown dataset {name!r}. Expected one of: {', '.join(DATASETS)}"
        ) from None


def load_arrays(name, split, data_dir=None):
    """Loads one split of a dataset as NumPy arrays.

    The arrays are read-only views of an in-process cache: copy them before editing.

    Args:
        name: One of `DATASETS`.
        split: `"train"` or `"test"`, optionally sliced tfds-style: `"train[:50000]"`,
            `"train[50000:]"`, `"test[:1000]"`, `"train[-10%:]"`.
        data_dir: Optional directory holding the dataset's standard distribution
            files (or a copy prepared by tensorflow-datasets).

    Returns:
        A tuple `(images, labels)`: uint8 images of shape `(N, H, W, C)` and int64
        labels of shape `(N,)`.

    Raises:
        ValueError: for an unknown dataset or split, or a data file that exists but
            is corrupt or truncated.
        FileNotFoundError: if no source has the dataset.
    """
    images, labels, _ = _select(name, split, data_dir)
    return images, labels


def load(name, split, data_dir=None, with_index=False):
    """Loads one split of a dataset as an unbatched `tf.data.Dataset`.

    Args:
        name: One of `DATASETS`.
        split: `"train"` or `"test"`, optionally sliced tfds-style (see `load_arrays`).
        data_dir: Optional directory holding the dataset's files (see `load_arrays`).
        with_index: Whether each element also carries the example's position in the
            full split, so that `"train[50000:]"` starts at index 50000.

    Returns:
        A tuple `(dataset, info)`. The dataset's elements are `(image, label)`, or
        `(image, label, index)` with `with_index=True`: float32 images in [0, 1] of
        shape `info.shape`, int64 labels and int64 indices.

    Raises:
        ValueError: see `load_arrays`.
        FileNotFoundError: see `load_arrays`.
    """
    ds_info = info(name)
    images, labels, start = _select(name, split, data_dir)
    # Slicing the uint8 arrays and converting each image on the fly keeps a quarter of
    # the memory a float32 copy of the split would take.
    if with_index:
        index = np.arange(start, start + len(labels), dtype=np.int64)
        ds = tf.data.Dataset.from_tensor_slices((images, labels, index))
        ds = ds.map(lambda x, y, i: (_to_float(x), y, i),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        ds = ds.map(lambda x, y: (_to_float(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds, ds_info


def pipeline(ds, batch_size, training=False, augment="none", seed=None,
             drop_remainder=False):
    """Batches a dataset for training or evaluation.

    For training, examples are shuffled (a new order each epoch), batched, and
    augmented; for evaluation they are only batched, in order. Either way the result
    is prefetched. Only the image, the first component of an `(image, label)` or
    `(image, label, index)` element, is augmented.

    Args:
        ds: An unbatched `tf.data.Dataset` of images or of tuples starting with an
            image, such as the dataset `load` returns.
        batch_size: Number of examples per batch.
        training: Whether to shuffle and augment.
        augment: `"crop_flip"` (zero-pad by 4 pixels, randomly crop back to the
            original size, randomly flip horizontally) or `"none"`. Ignored when not
            training.
        seed: Optional integer seed of the shuffle and augmentation, for reproducible
            epochs.
        drop_remainder: Whether to drop a last batch smaller than `batch_size`.

    Returns:
        A batched, prefetched `tf.data.Dataset`.

    Raises:
        ValueError: for an unknown `augment` or a non-positive `batch_size`.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"Unknown augment {augment!r}. Expected one of: {', '.join(AUGMENTATIONS)}"
        )
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if training:
        size = int(ds.cardinality())
        buffer = size if 0 < size <= MAX_SHUFFLE_BUFFER else MAX_SHUFFLE_BUFFER
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if training and augment == "crop_flip":
        # One random seed per batch that changes every epoch, for stateless (and so
        # reproducible, given `seed`) augmentation ops.
        seeds = tf.data.Dataset.random(
            seed=None if seed is None else seed + 1, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds))
        ds = ds.map(_augment_element, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def training_epochs(ds, batch_size, seed, epochs, first_epoch=0, augment="none"):
    """The training batches of epochs `first_epoch` ... `epochs - 1`, one after the other.

    Each epoch's order and augmentation depend on `(seed, epoch)` alone, unlike
    `pipeline`'s, which depend on how many epochs the same dataset object has already
    run: so a run resumed at epoch k sees exactly the batches an uninterrupted run saw.
    Feed it to `fit(..., steps_per_epoch=ceil(n / batch_size))`, which keeps one iterator
    across the epochs.

    Args:
        ds: An unbatched dataset of images or of tuples starting with an image.
        batch_size: Number of examples per batch (the last batch of an epoch may be
            smaller).
        seed: Integer seed of the shuffles and augmentations.
        epochs: One past the last epoch (0-based), as `fit(epochs=...)`.
        first_epoch: The first epoch (0-based), as `fit(initial_epoch=...)`.
        augment: `"crop_flip"` or `"none"`, as in `pipeline`.

    Returns:
        A finite, prefetched `tf.data.Dataset` of batches.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"Unknown augment {augment!r}. Expected one of: {', '.join(AUGMENTATIONS)}"
        )
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    size = int(ds.cardinality())
    buffer = size if 0 < size <= MAX_SHUFFLE_BUFFER else MAX_SHUFFLE_BUFFER
    seed = int(seed)

    @tf.autograph.experimental.do_not_convert  # autograph trips on shuffle's tensor seed
    def one_epoch(epoch):
        # The shuffle's two seeds are (this function graph's seed, the epoch): both set
        # here, so the order depends on nothing else. The graph seed is odd, never 0:
        # TensorFlow cannot take a tensor op seed beside a graph seed of 0.
        tf.random.set_seed(2 * seed + 1)
        batches = ds.shuffle(buffer, seed=epoch, reshuffle_each_iteration=False)
        batches = batches.batch(batch_size)
        # A large odd multiplier keeps the augmentation keys of (seed, epoch) pairs apart.
        key = tf.constant(seed, tf.int64) * 1000003 + epoch
        if augment == "crop_flip":
            # Stateless ops keyed by (seed, epoch, batch): the same crops every time.
            index = tf.data.Dataset.range(tf.int64.max)
            batches = tf.data.Dataset.zip((batches, index)).map(
                lambda element, i: _augment_element(element, key * 1000003 + i),
                num_parallel_calls=tf.data.AUTOTUNE)
        return batches

    epochs_ds = tf.data.Dataset.range(int(first_epoch), int(epochs))
    return epochs_ds.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def clear_cache():
    """Forgets the decoded arrays cached by `load_arrays` and `load`."""
    _load_split.cache_clear()


# ----------------------------------------------------------------------------- splits


def _parse_split(split):
    """Returns `(base, start, stop)` of a split string; bounds are raw strings or None."""
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if match is None:
        raise ValueError(f"Bad split {split!r}. Expected {_SPLIT_FORMS}")
    return match.group(1), match.group(2), match.group(3)


def _resolve_bound(bound, size, split):
    if bound.endswith("%"):
        percent = int(bound[:-1])
        if abs(percent) > 100:
            raise ValueError(f"Bad split {split!r}: {bound} is not a percentage in "
                             f"[-100%, 100%]. Expected {_SPLIT_FORMS}")
        # Round to the closest example, as tensorflow-datasets does.
        value = int(round(percent * size / 100))
    else:
        value = int(bound)
    if value < 0:
        value += size
    if not 0 <= value <= size:
        raise ValueError(f"Bad split {split!r}: {bound} is out of range for a split of "
                         f"{size} examples. Expected {_SPLIT_FORMS}")
    return value


def _select(name, split, data_dir):
    """Returns `(images, labels, start)` of a possibly sliced split."""
    info(name)
    base, start, stop = _parse_split(split)
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
        # Leave remote paths (gs://...) to tensorflow-datasets.
        if "://" not in data_dir:
            data_dir = os.path.abspath(os.path.expanduser(data_dir))
            if not os.path.isdir(data_dir):
                # A mistyped folder must not fall back to another copy, nor make
                # tensorflow-datasets create it and try to download into it.
                raise FileNotFoundError(
                    f"Dataset {name!r}: data_dir {data_dir} does not exist. Expected a "
                    f"folder holding {_EXPECTED_FILES[name]} (directly or in a subfolder "
                    f"{name}/), or a copy prepared by tensorflow-datasets")
    debian_dir = DEBIAN_FASHION_MNIST if name == "fashion_mnist" else None
    images, labels = _load_split(name, base, data_dir, debian_dir)
    size = len(labels)
    first = 0 if start is None else _resolve_bound(start, size, split)
    last = size if stop is None else _resolve_bound(stop, size, split)
    if first >= last:
        raise ValueError(f"Bad split {split!r}: it selects no examples of the "
                         f"{size} in {base!r}. Expected {_SPLIT_FORMS}")
    return images[first:last], labels[first:last], first


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=8)
def _load_split(name, base, data_dir, debian_dir):
    """Decodes a full split from the first source that has it; see the module doc."""
    ds_info = _INFOS[name]
    arrays = None
    if data_dir is not None and os.path.isdir(data_dir):
        for location in _locations(name, data_dir):
            arrays = _read_local(name, base, location)
            if arrays is not None:
                break
    if arrays is None and debian_dir is not None and os.path.isdir(debian_dir):
        arrays = _read_idx_pair(base, debian_dir)
    if arrays is None:
        try:
            arrays = _read_tfds(name, base, data_dir)
        except Exception as e:  # Offline, not installed, not prepared: all the same.
            raise FileNotFoundError(_missing_message(name, data_dir, e)) from e
    images, labels, source = arrays
    _check_arrays(ds_info, images, labels, source)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _locations(name, data_dir):
    folders = [data_dir, os.path.join(data_dir, name)]
    folders += [os.path.join(data_dir, alias) for alias in _FOLDER_ALIASES.get(name, ())]
    return [f for f in folders if os.path.isdir(f)]


def _read_local(name, base, directory):
    """Returns `(images, labels, source)` from standard files in `directory`, or None."""
    if name in ("mnist", "fashion_mnist"):
        return _read_idx_pair(base, directory)
    if name in _CIFAR_SOURCES:
        return _read_cifar(name, base, directory)
    return _read_svhn(base, directory)


def _read_tfds(name, base, data_dir):
    import tensorflow_datasets as tfds

    images, labels = tfds.load(_TFDS_NAMES.get(name, name), split=base,
                               data_dir=data_dir, batch_size=-1, as_supervised=True)
    images = np.asarray(images, dtype=np.uint8)
    labels = np.asarray(labels).astype(np.int64)
    return images, labels, f"tensorflow-datasets ({_TFDS_NAMES.get(name, name)})"


def _missing_message(name, data_dir, error):
    lines = str(error).strip().splitlines()
    first_line = lines[0] if lines else type(error).__name__
    if data_dir is None:
        looked = "no --data_dir given"
    elif not os.path.isdir(data_dir):
        looked = f"{data_dir} does not exist"
    else:
        looked = "looked in: " + ", ".join(_locations_description(name, data_dir))
    ways = [f"put the standard files ({_EXPECTED_FILES[name]}) under --data_dir "
            f"or under --data_dir/{name} ({looked})"]
    if name == "fashion_mnist":
        ways.append("`apt-get install -y dataset-fashion-mnist`, which puts them in "
                    f"{DEBIAN_FASHION_MNIST}")
    ways.append("go online so tensorflow-datasets can download it")
    numbered = "; ".join(f"({i}) {way}" for i, way in enumerate(ways, 1))
    return (f"Dataset {name!r} not found. Get it one of these ways: {numbered}. "
            f"tensorflow-datasets said: {type(error).__name__}: {first_line}")


def _locations_description(name, data_dir):
    return [data_dir, os.path.join(data_dir, name)] + [
        os.path.join(data_dir, alias) for alias in _FOLDER_ALIASES.get(name, ())]


def _check_arrays(ds_info, images, labels, source):
    if images.ndim != 4 or tuple(images.shape[1:]) != ds_info.shape:
        raise ValueError(f"{source}: expected {ds_info.name} images of shape "
                         f"(N, {', '.join(map(str, ds_info.shape))}), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{source}: expected {images.shape[0]} labels (one per image), "
                         f"got an array of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= ds_info.num_classes):
        raise ValueError(f"{source}: expected labels in [0, {ds_info.num_classes}), got "
                         f"values in [{labels.min()}, {labels.max()}]")


# ------------------------------------------------------------------------- MNIST idx


def _read_idx_pair(base, directory):
    """Reads the idx images and labels of a split, or returns None if neither exists."""
    image_stem, label_stem = _IDX_FILES[base]
    image_path = _find_idx(directory, image_stem)
    label_path = _find_idx(directory, label_stem)
    if image_path is None and label_path is None:
        return None
    if image_path is None or label_path is None:
        found, missing = ((image_path, label_stem) if label_path is None
                          else (label_path, image_stem))
        raise ValueError(f"Found {found} but not {missing}(.gz) beside it: the "
                         f"{base!r} split needs both its images and its labels")
    images = _read_idx(image_path, ndim=3)
    labels = _read_idx(label_path, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} "
                         f"holds {len(labels)} labels: expected as many of each")
    return images[..., np.newaxis], labels, image_path


def _find_idx(directory, stem):
    # Prefer the uncompressed file: it reads faster.
    for suffix in ("", ".gz"):
        path = os.path.join(directory, stem + suffix)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path, ndim):
    """Decodes an idx file of unsigned bytes with `ndim` dimensions."""
    gzipped = path.endswith(".gz")
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        kind = "a gzipped idx file" if gzipped else "an idx file"
        raise ValueError(f"Cannot read {path}: expected {kind} "
                         f"({type(e).__name__}: {e})") from e
    magic = 0x800 + ndim
    if len(data) < 4 or struct.unpack(">I", data[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', data[:4])[0]:08x}" if len(data) >= 4 else "none"
        raise ValueError(f"{path} is not an idx file of {ndim}-d unsigned bytes: expected "
                         f"the magic number 0x{magic:08x}, found {found}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: expected a {header}-byte idx header, "
                         f"found {len(data)} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: its header gives shape {dims}, "
                         f"so expected {expected} bytes, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


# ----------------------------------------------------------------------------- CIFAR


def _read_cifar(name, base, directory):
    """Reads a CIFAR split from the first distribution present in `directory`."""
    for fmt, folder, tarball, members in _CIFAR_SOURCES[name]:
        wanted = members[base]
        candidates = [os.path.join(directory, folder)]
        if os.path.basename(os.path.normpath(directory)) == folder:
            candidates.append(directory)  # data_dir is the extracted folder itself.
        for candidate in candidates:
            if os.path.isdir(candidate):
                missing = [m for m in wanted
                           if not os.path.isfile(os.path.join(candidate, m))]
                if missing:
                    raise ValueError(f"{candidate} is incomplete: expected "
                                     f"{', '.join(wanted)} in it, missing "
                                     f"{', '.join(missing)}")
                chunks = []
                for member in wanted:
                    path = os.path.join(candidate, member)
                    with open(path, "rb") as f:
                        chunks.append((path, f.read()))
                return _decode_cifar(name, fmt, chunks) + (candidate,)
        tar_path = os.path.join(directory, tarball)
        if os.path.isfile(tar_path):
            chunks = _read_tar_members(tar_path, wanted)
            return _decode_cifar(name, fmt, chunks) + (tar_path,)
    return None


def _read_tar_members(path, wanted):
    """Returns `[(description, bytes)]` of the tar members named `wanted`, in order."""
    found = {}
    try:
        # Stream mode decompresses the archive once, front to back.
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted and base not in found:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"Cannot read {path}: expected a tar archive holding "
                         f"{', '.join(wanted)} ({type(e).__name__}: {e})") from e
    missing = [m for m in wanted if m not in found]
    if missing:
        raise ValueError(f"{path} is incomplete: expected members {', '.join(wanted)}, "
                         f"missing {', '.join(missing)}")
    return [(f"{path}:{m}", found[m]) for m in wanted]


def _decode_cifar(name, fmt, chunks):
    """Decodes `[(description, bytes)]` of one CIFAR format into `(images, labels)`."""
    pixels = 32 * 32 * 3
    images, labels = [], []
    for where, data in chunks:
        if fmt == "binary":
            # Records are label byte(s) then 3072 pixel bytes (CHW); CIFAR-100 has a
            # coarse then a fine label byte, and the fine one is the class.
            label_bytes = 2 if name == "cifar100" else 1
            record = label_bytes + pixels
            if len(data) == 0 or len(data) % record:
                raise ValueError(f"{where} is truncated or corrupt: expected a whole "
                                 f"number of {record}-byte records, found {len(data)} bytes")
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
            labels.append(rows[:, label_bytes - 1].astype(np.int64))
            flat = rows[:, label_bytes:]
        else:
            flat, batch_labels = _unpickle_cifar(name, where, data)
            labels.append(batch_labels)
        images.append(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return (np.ascontiguousarray(np.concatenate(images)),
            np.concatenate(labels).astype(np.int64))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR python batch holds: dicts, lists, bytes, numbers and
    NumPy arrays. A pickle may name any callable to run while it loads (that is how code
    gets executed from a crafted file); every name other than NumPy's array rebuilders
    is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 writes Python 3 bytes: encode(text, latin1)
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR batch never does (only NumPy "
                f"arrays, lists, numbers and bytes are read; nothing in the file is run)")
        if name == "encode":
            return _latin1_bytes
        try:
            from numpy._core import multiarray, numeric
        except ImportError:  # NumPy 1
            from numpy.core import multiarray, numeric

        return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
                "_frombuffer": numeric._frombuffer, "ndarray": np.ndarray,
                "dtype": np.dtype}[name]


def _latin1_bytes(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected encode({type(text).__name__}, "
                                     f"{encoding!r}) in a CIFAR batch")
    return text.encode("latin1")


def _unpickle_cifar(name, where, data):
    label_key = "fine_labels" if name == "cifar100" else "labels"
    try:
        # The official batches are Python 2 pickles with byte-string keys.
        batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"Cannot read {where}: expected a pickled CIFAR batch "
                         f"({type(e).__name__}: {e})") from e

    def get(key):
        if isinstance(batch, dict):
            for k in (key.encode(), key):
                if k in batch:
                    return batch[k]
        raise ValueError(f"{where} is not a CIFAR batch: expected a dict with "
                         f"'data' and {label_key!r} entries")

    flat = np.asarray(get("data"))
    labels = np.asarray(get(label_key)).astype(np.int64).reshape(-1)
    if flat.dtype != np.uint8 or flat.ndim != 2 or flat.shape[1] != 32 * 32 * 3:
        raise ValueError(f"{where}: expected 'data' of uint8 and shape (N, 3072), got "
                         f"{flat.dtype} of shape {flat.shape}")
    if len(labels) != len(flat):
        raise ValueError(f"{where}: expected one label per image, got {len(labels)} "
                         f"labels for {len(flat)} images")
    return flat, labels


# ------------------------------------------------------------------------------ SVHN


def _read_svhn(base, directory):
    path = os.path.join(directory, _SVHN_FILES[base])
    if not os.path.isfile(path):
        return None
    try:
        import scipy.io
    except ImportError as e:
        raise ImportError(f"Reading {path} needs SciPy: pip install scipy") from e
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        raise ValueError(f"Cannot read {path}: expected a MATLAB file with 'X' and 'y' "
                         f"({type(e).__name__}: {e})") from e
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise ValueError(f"{path}: expected the MATLAB variables 'X' and 'y', found "
                         f"{', '.join(k for k in mat if not k.startswith('__'))}")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: expected 'X' of uint8 and shape (32, 32, 3, N), got "
                         f"{x.dtype} of shape {x.shape}")
    # 'X' is HWCN; the digit 0 has the label 10.
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return images, labels, path


# ----------------------------------------------------------------------- tf functions


def _to_float(image):
    return tf.cast(image, tf.float32) / 255.0


def _augment_element(element, seed):
    if isinstance(element, (tuple, list)):
        return (_random_crop_flip(element[0], seed),) + tuple(element[1:])
    return _random_crop_flip(element, seed)


def _random_crop_flip(images, seed, pad=CROP_PADDING):
    """Pads a batch of NHWC images with zeros, crops each back at random, may flip it."""
    shape = tf.shape(images)
    batch = shape[0]
    height = images.shape[1] if images.shape[1] is not None else shape[1]
    width = images.shape[2] if images.shape[2] is not None else shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    seed = tf.cast(seed, tf.int64)
    offsets = tf.random.stateless_uniform(
        [2, batch], seed=tf.stack([seed, tf.constant(0, tf.int64)]),
        minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform(
        [batch], seed=tf.stack([seed, tf.constant(1, tf.int64)])) < 0.5
    # Crop and flip in one gather per axis: row i of example b comes from padded row
    # top[b] + i; column j from left[b] + j, or left[b] + width - 1 - j when flipped.
    rows = offsets[0][:, None] + tf.range(height)[None, :]
    cols = tf.range(width)[None, :]
    cols = tf.where(flip[:, None], width - 1 - cols, cols) + offsets[1][:, None]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    out.set_shape(images.shape)
    return out
