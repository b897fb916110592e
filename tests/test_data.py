"""Tests of again_tf.data: metadata, every on-disk format, fallbacks, pipelines."""

import dataclasses
import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from again_tf import data

HAVE_DEBIAN_FMNIST = os.path.isfile(
    os.path.join(data.DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz"))
needs_debian = pytest.mark.skipif(
    not HAVE_DEBIAN_FMNIST, reason="apt-get install -y dataset-fashion-mnist")


@pytest.fixture
def no_tfds(monkeypatch):
    """Fails the test if loading falls through to tensorflow-datasets."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def fail(*args, **kwargs):
        pytest.fail(f"tfds.load was called: {args} {kwargs}")

    monkeypatch.setattr(tfds, "load", fail)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- info


def test_info_values():
    assert data.DATASETS == ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn")
    for name in data.DATASETS:
        i = data.info(name)
        assert i.name == name
        assert len(i.class_names) == i.num_classes == len(set(i.class_names))
        assert len(i.mean) == len(i.std) == i.shape[2]
        assert all(0 < s < 1 for s in i.std) and all(0 < m < 1 for m in i.mean)
        assert i.augment in data.AUGMENTATIONS
    assert data.info("fashion_mnist").eps == pytest.approx(0.1)
    assert data.info("fashion_mnist").step_size == pytest.approx(0.025)
    assert data.info("mnist").eps == pytest.approx(0.3)
    assert data.info("mnist").step_size == pytest.approx(0.075)
    assert data.info("mnist").mean == (0.1307,) and data.info("mnist").std == (0.3081,)
    for name in ("cifar10", "cifar100", "svhn"):
        assert data.info(name).eps == pytest.approx(8 / 255)
        assert data.info(name).step_size == pytest.approx(2 / 255)
        assert data.info(name).augment == "crop_flip"
        assert data.info(name).shape == (32, 32, 3)
    assert data.info("cifar10").std == (0.2471, 0.2435, 0.2616)
    assert data.info("cifar100").num_classes == 100
    names = data.info("cifar100").class_names
    assert list(names) == sorted(names) and names[0] == "apple" and names[-1] == "worm"
    assert (data.info("svhn").train_size, data.info("svhn").test_size) == (73257, 26032)
    assert data.info("fashion_mnist").shape == (28, 28, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.info("mnist").eps = 0.5


@pytest.mark.parametrize("call", [
    lambda: data.info("foo"),
    lambda: data.load_arrays("foo", "train"),
    lambda: data.load("foo", "train"),
])
def test_unknown_dataset(call):
    with pytest.raises(ValueError) as e:
        call()
    message = str(e.value)
    assert "'foo'" in message and "\n" not in message
    assert "fashion_mnist, mnist, cifar10, cifar100, svhn" in message


@pytest.mark.parametrize("split", ["validation", "TRAIN", "train[:abc]", "train[1:2:3]",
                                   "train[:50000", "train[]", "test[5]", 5])
def test_bad_split_is_rejected_before_loading(split):
    # cifar10 has no data here: a ValueError (not FileNotFoundError) shows the split is
    # checked first.
    with pytest.raises(ValueError) as e:
        data.load_arrays("cifar10", split, data_dir="/nonexistent")
    assert repr(split) in str(e.value)
    assert "train[:50000]" in str(e.value) and "test[:1000]" in str(e.value)


# -------------------------------------------------------------- real Fashion-MNIST


@needs_debian
def test_fashion_mnist_arrays_from_debian():
    x, y = data.load_arrays("fashion_mnist", "train")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    np.testing.assert_array_equal(np.bincount(y), [6000] * 10)
    assert abs(x.mean() / 255 - 0.2860) < 1e-3
    xt, yt = data.load_arrays("fashion_mnist", "test")
    assert xt.shape == (10000, 28, 28, 1) and xt.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(yt), [1000] * 10)
    # Cached and read-only: a second call decodes nothing and nobody can corrupt it.
    x2, _ = data.load_arrays("fashion_mnist", "train[:10]")
    assert np.shares_memory(x, x2)
    assert not x.flags.writeable and not y.flags.writeable


@needs_debian
def test_fashion_mnist_load_values_and_mean():
    ds, ds_info = data.load("fashion_mnist", "train")
    assert ds_info is data.info("fashion_mnist")
    assert ds.element_spec[0] == tf.TensorSpec((28, 28, 1), tf.float32)
    assert ds.element_spec[1] == tf.TensorSpec((), tf.int64)
    total, lo, hi, count = 0.0, 1.0, 0.0, 0
    for xb, _ in data.pipeline(ds, 10000):
        xb = xb.numpy()
        total += float(xb.sum(dtype=np.float64))
        lo, hi, count = min(lo, xb.min()), max(hi, xb.max()), count + len(xb)
    assert count == 60000
    assert lo == 0.0 and hi == 1.0
    assert abs(total / (60000 * 28 * 28) - 0.2860) < 1e-3


@needs_debian
def test_fashion_mnist_slices_with_index():
    x, y = data.load_arrays("fashion_mnist", "train")
    for split, start, stop in [("train[:100]", 0, 100), ("train[59000:]", 59000, 60000),
                               ("train[-10%:]", 54000, 60000)]:
        xs, ys = data.load_arrays("fashion_mnist", split)
        np.testing.assert_array_equal(xs, x[start:stop])
        ds, _ = data.load("fashion_mnist", split, with_index=True)
        (xb, yb, ib), = data.pipeline(ds, 10000).as_numpy_iterator()
        np.testing.assert_array_equal(ib, np.arange(start, stop))
        np.testing.assert_array_equal(yb, y[start:stop])
        np.testing.assert_allclose(xb, x[start:stop] / 255.0, atol=1e-7)
    (_, _, it), = data.pipeline(data.load("fashion_mnist", "test[:1000]", with_index=True)[0],
                                2000).as_numpy_iterator()
    np.testing.assert_array_equal(it, np.arange(1000))


@needs_debian
@pytest.mark.parametrize("split", ["train[:70000]", "train[60000:]", "train[500:100]",
                                   "test[-20000:]"])
def test_out_of_range_split(split):
    with pytest.raises(ValueError, match=r"Bad split"):
        data.load_arrays("fashion_mnist", split)


@needs_debian
def test_index_survives_training_pipeline():
    x, y = data.load_arrays("fashion_mnist", "train[59900:]")
    ds, _ = data.load("fashion_mnist", "train[59900:]", with_index=True)
    seen = []
    for xb, yb, ib in data.pipeline(ds, 32, training=True, seed=1).as_numpy_iterator():
        rows = ib - 59900
        np.testing.assert_array_equal(yb, y[rows])
        np.testing.assert_allclose(xb, x[rows] / 255.0, atol=1e-7)
        seen.extend(ib)
    assert sorted(seen) == list(range(59900, 60000)) and seen != sorted(seen)


# ------------------------------------------------------------------------- MNIST idx


def _idx_bytes(array, magic=None):
    magic = 0x800 + array.ndim if magic is None else magic
    return (struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(np.uint8).tobytes())


def _write_idx_set(directory, images, labels, compress=True, prefix="train"):
    stem = "t10k" if prefix == "test" else "train"
    os.makedirs(directory, exist_ok=True)
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        path = os.path.join(directory, f"{stem}-{kind}")
        if compress:
            with gzip.open(path + ".gz", "wb") as f:
                f.write(_idx_bytes(array))
        else:
            with open(path, "wb") as f:
                f.write(_idx_bytes(array))


def _mnist_like(n, seed):
    images = _rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[0] = 0
    images[0, 0, 27] = 200  # top-right corner: a transposition moves it.
    images[0, 27, 0] = 7
    labels = _rng(seed + 1).integers(0, 10, n).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("compress,subfolder", [(True, ""), (False, "mnist")])
def test_mnist_idx_files(tmp_path, no_tfds, compress, subfolder):
    train_x, train_y = _mnist_like(12, 0)
    test_x, test_y = _mnist_like(5, 10)
    folder = os.path.join(tmp_path, subfolder)
    _write_idx_set(folder, train_x, train_y, compress, "train")
    _write_idx_set(folder, test_x, test_y, compress, "test")
    x, y = data.load_arrays("mnist", "train", data_dir=tmp_path)
    assert x.shape == (12, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x[..., 0], train_x)
    np.testing.assert_array_equal(y, train_y)
    assert x[0, 0, 27, 0] == 200 and x[0, 27, 0, 0] == 7
    x, y = data.load_arrays("mnist", "test[2:]", data_dir=str(tmp_path))
    np.testing.assert_array_equal(x[..., 0], test_x[2:])
    np.testing.assert_array_equal(y, test_y[2:])


def test_mnist_data_dir_overrides_debian_fashion(tmp_path, no_tfds):
    train_x, train_y = _mnist_like(3, 4)
    _write_idx_set(tmp_path / "fashion_mnist", train_x, train_y)
    x, y = data.load_arrays("fashion_mnist", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(x[..., 0], train_x)
    np.testing.assert_array_equal(y, train_y)


def test_idx_bad_magic(tmp_path, no_tfds):
    images, labels = _mnist_like(3, 0)
    _write_idx_set(tmp_path, images, labels)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(_idx_bytes(images, magic=0x801))
    with pytest.raises(ValueError) as e:
        data.load_arrays("mnist", "train", data_dir=tmp_path)
    assert str(path) in str(e.value) and "0x00000803" in str(e.value)


def test_idx_truncated(tmp_path, no_tfds):
    images, labels = _mnist_like(3, 0)
    _write_idx_set(tmp_path, images, labels, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError) as e:
        data.load_arrays("mnist", "train", data_dir=tmp_path)
    assert str(path) in str(e.value) and "truncated" in str(e.value)


def test_idx_truncated_gzip(tmp_path, no_tfds):
    images, labels = _mnist_like(20, 0)
    _write_idx_set(tmp_path, images, labels)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError) as e:
        data.load_arrays("mnist", "train", data_dir=tmp_path)
    assert str(path) in str(e.value) and "gzipped idx file" in str(e.value)


def test_idx_half_pair(tmp_path, no_tfds):
    images, labels = _mnist_like(3, 0)
    _write_idx_set(tmp_path, images, labels)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        data.load_arrays("mnist", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------- CIFAR


def _cifar_batches(n_per_batch, num_batches, seed, num_classes=10):
    rng = _rng(seed)
    return [(rng.integers(0, 256, (n_per_batch, 32, 32, 3), dtype=np.uint8),
             rng.integers(0, num_classes, n_per_batch)) for _ in range(num_batches)]


def _chw(images):
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _binary_records(images, *label_columns):
    labels = np.stack(label_columns, axis=1).astype(np.uint8)
    return np.concatenate([labels, _chw(images)], axis=1).tobytes()


def _write_files(files, folder=None, tarball=None, tar_folder=None):
    """Writes {member name: bytes} into `folder` and/or a tar.gz under `tar_folder/`."""
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        for member, payload in files.items():
            with open(os.path.join(folder, member), "wb") as f:
                f.write(payload)
    if tarball is not None:
        with tarfile.open(tarball, "w:gz") as tar:
            for member, payload in files.items():
                entry = tarfile.TarInfo(f"{tar_folder}/{member}")
                entry.size = len(payload)
                tar.addfile(entry, io.BytesIO(payload))


def _cifar10_files(fmt, train, test):
    files = {}
    batches = train + test
    for i, (x, y) in enumerate(batches):
        member = f"data_batch_{i + 1}" if i < len(train) else "test_batch"
        if fmt == "binary":
            files[member + ".bin"] = _binary_records(x, y)
        else:
            files[member] = pickle.dumps(
                {b"batch_label": b"synthetic", b"labels": [int(v) for v in y],
                 b"data": _chw(x), b"filenames": [b"f.png"] * len(y)}, protocol=2)
    files["batches.meta.txt" if fmt == "binary" else "batches.meta"] = b"meta"
    return files


@pytest.mark.parametrize("layout", ["tarball", "folder", "folder_is_data_dir",
                                    "subfolder_tarball"])
@pytest.mark.parametrize("fmt", ["binary", "python"])
def test_cifar10(tmp_path, no_tfds, fmt, layout):
    train = _cifar_batches(3, 5, seed=1)
    test = _cifar_batches(4, 1, seed=2)
    files = _cifar10_files(fmt, train, test)
    folder = "cifar-10-batches-bin" if fmt == "binary" else "cifar-10-batches-py"
    tarball = "cifar-10-binary.tar.gz" if fmt == "binary" else "cifar-10-python.tar.gz"
    data_dir = tmp_path
    if layout == "tarball":
        _write_files(files, tarball=tmp_path / tarball, tar_folder=folder)
    elif layout == "subfolder_tarball":
        os.makedirs(tmp_path / "cifar10")
        _write_files(files, tarball=tmp_path / "cifar10" / tarball, tar_folder=folder)
    elif layout == "folder":
        _write_files(files, folder=tmp_path / folder)
    else:
        _write_files(files, folder=tmp_path / folder)
        data_dir = tmp_path / folder
    x, y = data.load_arrays("cifar10", "train", data_dir=data_dir)
    assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, np.concatenate([b[0] for b in train]))
    np.testing.assert_array_equal(y, np.concatenate([b[1] for b in train]))
    x, y = data.load_arrays("cifar10", "test", data_dir=data_dir)
    np.testing.assert_array_equal(x, test[0][0])
    np.testing.assert_array_equal(y, test[0][1])


@pytest.mark.parametrize("fmt,layout", [("binary", "tarball"), ("binary", "folder"),
                                        ("python", "tarball"), ("python", "folder")])
def test_cifar100_uses_fine_labels(tmp_path, no_tfds, fmt, layout):
    rng = _rng(5)
    splits = {}
    for split, n in (("train", 7), ("test", 3)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(20, 100, n)
        coarse = fine % 20  # Always differs from the fine label.
        splits[split] = (x, fine, coarse)
    if fmt == "binary":
        files = {f"{s}.bin": _binary_records(x, c, f) for s, (x, f, c) in splits.items()}
        folder, tarball = "cifar-100-binary", "cifar-100-binary.tar.gz"
    else:
        files = {s: pickle.dumps({b"filenames": [b"a"] * len(f), b"data": _chw(x),
                                  b"fine_labels": [int(v) for v in f],
                                  b"coarse_labels": [int(v) for v in c]}, protocol=2)
                 for s, (x, f, c) in splits.items()}
        folder, tarball = "cifar-100-python", "cifar-100-python.tar.gz"
    if layout == "tarball":
        _write_files(files, tarball=tmp_path / tarball, tar_folder=folder)
    else:
        _write_files(files, folder=tmp_path / folder)
    for split, (x, fine, _) in splits.items():
        got_x, got_y = data.load_arrays("cifar100", split, data_dir=tmp_path)
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, fine)


def test_cifar_corrupt_tarball(tmp_path, no_tfds):
    path = tmp_path / "cifar-10-binary.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(500))
    with pytest.raises(ValueError) as e:
        data.load_arrays("cifar10", "test", data_dir=tmp_path)
    assert str(path) in str(e.value)


def test_cifar_truncated_record_file(tmp_path, no_tfds):
    files = _cifar10_files("binary", _cifar_batches(2, 5, 0), _cifar_batches(2, 1, 1))
    files["data_batch_3.bin"] = files["data_batch_3.bin"][:-1]
    _write_files(files, folder=tmp_path / "cifar-10-batches-bin")
    with pytest.raises(ValueError) as e:
        data.load_arrays("cifar10", "train", data_dir=tmp_path)
    assert "data_batch_3.bin" in str(e.value) and "3073" in str(e.value)


def test_cifar_tarball_missing_member(tmp_path, no_tfds):
    files = _cifar10_files("binary", _cifar_batches(2, 5, 0), _cifar_batches(2, 1, 1))
    del files["data_batch_5.bin"]
    _write_files(files, tarball=tmp_path / "cifar-10-binary.tar.gz",
                 tar_folder="cifar-10-batches-bin")
    assert data.load_arrays("cifar10", "test", data_dir=tmp_path)[0].shape[0] == 2
    with pytest.raises(ValueError, match="data_batch_5.bin"):
        data.load_arrays("cifar10", "train", data_dir=tmp_path)


# ------------------------------------------------------------------------------ SVHN


@pytest.mark.parametrize("subfolder", ["", "svhn"])
def test_svhn_mat(tmp_path, no_tfds, subfolder):
    scipy_io = pytest.importorskip("scipy.io")
    rng = _rng(3)
    folder = tmp_path / subfolder
    os.makedirs(folder, exist_ok=True)
    expected = {}
    for split, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(1, 11, n).astype(np.uint8)
        y[0] = 10
        scipy_io.savemat(folder / f"{split}_32x32.mat",
                         {"X": x.transpose(1, 2, 3, 0), "y": y[:, None]})
        expected[split] = (x, y % 10)
    for split, (x, y) in expected.items():
        got_x, got_y = data.load_arrays("svhn", split, data_dir=tmp_path)
        assert got_x.shape == x.shape and got_y.dtype == np.int64
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
        assert got_y[0] == 0


def test_svhn_corrupt_mat(tmp_path, no_tfds):
    pytest.importorskip("scipy.io")
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 10)
    with pytest.raises(ValueError) as e:
        data.load_arrays("svhn", "test", data_dir=tmp_path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------- tfds and nothing


def test_tfds_fallback(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []
    x = _rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)

    def fake_load(name, **kwargs):
        calls.append((name, kwargs))
        return tf.constant(x), tf.constant([1, 2, 3, 4, 0], tf.int64)

    monkeypatch.setattr(tfds, "load", fake_load)
    got_x, got_y = data.load_arrays("svhn", "test[1:]", data_dir=tmp_path)
    np.testing.assert_array_equal(got_x, x[1:])
    np.testing.assert_array_equal(got_y, [2, 3, 4, 0])
    assert calls == [("svhn_cropped", {"split": "test", "data_dir": str(tmp_path),
                                       "batch_size": -1, "as_supervised": True})]


def test_nothing_found(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to reach the download server\nsecond line of detail")

    monkeypatch.setattr(tfds, "load", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(empty))
    with pytest.raises(FileNotFoundError) as e:
        data.load_arrays("fashion_mnist", "train", data_dir=tmp_path)
    message = str(e.value)
    for part in ("fashion_mnist", "--data_dir", "train-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz", "apt-get install -y dataset-fashion-mnist",
                 "tensorflow-datasets", str(tmp_path)):
        assert part in message
    assert message.endswith("Failed to reach the download server")
    assert "second line" not in message
    with pytest.raises(FileNotFoundError) as e:
        data.load("cifar100", "test")
    assert "cifar-100-binary.tar.gz" in str(e.value) and "apt-get" not in str(e.value)


# ------------------------------------------------------------------------- pipeline


def _toy(n, shape=(32, 32, 3), seed=0):
    images = _rng(seed).uniform(0.1, 1.0, (n,) + shape).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % 7
    index = np.arange(100, 100 + n, dtype=np.int64)
    return images, labels, index


def _crop_flip_candidates(image, pad=4):
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def _which_transform(out, image):
    for transform, candidate in _crop_flip_candidates(image):
        if np.array_equal(out, candidate):
            return transform
    return None


@pytest.mark.parametrize("with_index", [False, True])
def test_crop_flip(with_index):
    images, labels, index = _toy(24)
    elements = (images, labels, index) if with_index else (images, labels)
    ds = tf.data.Dataset.from_tensor_slices(elements)
    out = data.pipeline(ds, 8, training=True, augment="crop_flip", seed=0)
    assert out.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    transforms, batches = [], list(out.as_numpy_iterator())
    assert len(batches) == 3
    for batch in batches:
        assert len(batch) == len(elements)
        if with_index:
            rows = batch[2] - 100
        else:  # No index: find the input each output was cut from.
            rows = [next(r for r in range(len(images))
                         if _which_transform(o, images[r]) is not None)
                    for o in batch[0]]
        for out_image, label, row in zip(batch[0], batch[1], rows):
            assert label == labels[row]
            transform = _which_transform(out_image, images[row])
            assert transform is not None, "not a padded crop (and flip) of its input"
            transforms.append(transform)
    assert len(transforms) == 24
    assert len(set(transforms)) > 5  # Per-example, not per-batch, randomness.
    assert any(t != (4, 4, False) for t in transforms)
    assert any(t[2] for t in transforms) and not all(t[2] for t in transforms)


def test_crop_flip_seeded_and_new_each_epoch():
    images, labels, index = _toy(16)
    # One image repeated: shuffling changes nothing, so any difference between epochs
    # comes from the augmentation.
    images = np.repeat(images[:1], 16, axis=0)
    ds = tf.data.Dataset.from_tensor_slices((images, labels, index))

    def epochs(pipe, n):
        return [np.concatenate([b[0] for b in pipe.as_numpy_iterator()]) for _ in range(n)]

    a = epochs(data.pipeline(ds, 16, training=True, augment="crop_flip", seed=7), 2)
    b = epochs(data.pipeline(ds, 16, training=True, augment="crop_flip", seed=7), 1)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], a[1])


def test_training_pipeline_reshuffles_each_epoch():
    images, labels, index = _toy(200, shape=(2, 2, 1))
    ds = tf.data.Dataset.from_tensor_slices((images, labels, index))
    pipe = data.pipeline(ds, 50, training=True, seed=3)
    orders = [np.concatenate([b[2] for b in pipe.as_numpy_iterator()]) for _ in range(2)]
    for order in orders:
        assert sorted(order) == list(range(100, 300))
        assert list(order) != list(range(100, 300))
    assert list(orders[0]) != list(orders[1])
    again = data.pipeline(ds, 50, training=True, seed=3)
    np.testing.assert_array_equal(
        np.concatenate([b[2] for b in again.as_numpy_iterator()]), orders[0])
    # augment="none" moves examples around but leaves them untouched.
    for xb, yb, ib in pipe.as_numpy_iterator():
        np.testing.assert_array_equal(xb, images[ib - 100])
        np.testing.assert_array_equal(yb, labels[ib - 100])


def test_eval_pipeline_keeps_order_and_skips_augmentation():
    images, labels, index = _toy(10)
    ds = tf.data.Dataset.from_tensor_slices((images, labels, index))
    batches = list(data.pipeline(ds, 4, augment="crop_flip").as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), images)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in batches]), index)
    dropped = data.pipeline(ds, 4, drop_remainder=True)
    assert [len(b[0]) for b in dropped.as_numpy_iterator()] == [4, 4]
    assert dropped.element_spec[0].shape.as_list() == [4, 32, 32, 3]


def test_bad_augment():
    ds = tf.data.Dataset.from_tensor_slices(_toy(2)[:2])
    with pytest.raises(ValueError) as e:
        data.pipeline(ds, 2, training=True, augment="mixup")
    assert "'mixup'" in str(e.value)
    assert "none" in str(e.value) and "crop_flip" in str(e.value)
