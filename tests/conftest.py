"""Shared fixtures: small real Fashion-MNIST subsets and a briefly trained small CNN."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    cpu_log = None
    if os.environ.get("AGAIN_TF_TEST_CPU_LOG"):  # checked here, in the controller too:
        from cpu_log import CpuLog  # an unwritable file stops the run at once, in one line

        cpu_log = CpuLog(os.environ["AGAIN_TF_TEST_CPU_LOG"])
    # pytest-xdist's controller only hands out files: TensorFlow (~5 CPU-seconds to import)
    # is loaded by the processes that run tests, the workers or a run without xdist.
    if os.environ.get("PYTEST_XDIST_WORKER") or config.getoption("dist", "no") == "no":
        # First: again_tf imports TensorFlow without its CPU start-up noise (again_tf.startup).
        import again_tf  # noqa: F401

        if os.environ.get("AGAIN_TF_TEST_OP_STACKS") != "1":
            without_op_stacks()
        if os.environ.get("AGAIN_TF_TEST_DATA_AUTOTUNE") != "1":
            without_data_autotuning()
        if cpu_log is not None:
            config.pluginmanager.register(cpu_log)


def without_op_stacks():
    """Every graph operation TensorFlow creates records the Python stack that created it,
    for the "defined at" part of its error messages: 15% of the suite's tracing samples
    (docs/testing.md; `python benchmarks/op_stacks.py` times a model's first `fit` with
    and without). The tests' processes record one constant stack instead; the scripts'
    subprocesses keep TensorFlow's. What is computed does not change, only where a graph
    error says its op was made. AGAIN_TF_TEST_OP_STACKS=1 keeps the stacks, for debugging."""
    from tensorflow.python.util import tf_stack  # private: TensorFlow has no switch for it

    if not callable(getattr(tf_stack, "extract_stack", None)):
        return  # a TensorFlow without it (constraints.txt pins one with it): stacks kept
    constant = tf_stack.extract_stack()
    tf_stack.extract_stack = lambda stacklevel=1: constant


def without_data_autotuning():
    """Iterating a `tf.data` pipeline with autotuning on starts a model thread that sleeps
    up to a minute between tuning rounds, and deleting the iterator waits for that thread
    to end, with the GIL held. Deleting an iterator should wake the thread at once; now and
    then (seen with TensorFlow 2.21.0) it does not, and the process stands still, using no
    CPU, until the thread's sleep runs out (gdb: the main thread in `RootDataset::Iterator`'s
    destructor waiting for its thread, that thread waiting in `Model::OptimizeLoop`; see
    docs/testing.md). The suite makes an iterator for every epoch of `fit` and for every
    `evaluate` and `predict`; one or two such waits cost about half its runs 50-130 s. The test
    processes iterate every dataset with autotuning off: the same elements in the same
    order, only prefetching and parallelism are not tuned. The scripts' subprocesses keep
    TensorFlow's default. AGAIN_TF_TEST_DATA_AUTOTUNE=1 keeps autotuning on."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    iterate = tf.data.Dataset.__iter__

    def __iter__(self):
        return iterate(self.with_options(options))

    tf.data.Dataset.__iter__ = __iter__


def fashion(split):
    import numpy as np
    from again_tf import data

    x, y = data.load_arrays("fashion_mnist", split)
    return x.astype(np.float32) / 255.0, y.astype(np.int64)


@pytest.fixture(scope="session")
def fashion_train():
    return fashion("train[:3000]")


@pytest.fixture(scope="session")
def fashion_test():
    return fashion("test[:500]")


@pytest.fixture(scope="session")
def trained_cnn(fashion_train):
    """A small CNN trained normally for 3 epochs on 3,000 images (~80% clean accuracy)."""
    import keras
    from again_tf import models

    keras.utils.set_random_seed(0)
    model = models.SmallCNN(num_classes=10, width=8, hidden=64, mean=(0.286,), std=(0.353,))
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = fashion_train
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


# The files by the CPU seconds their tests use, largest first (`python benchmarks/suite_cpu.py`
# on an idle run's AGAIN_TF_TEST_CPU_LOG, docs/testing.md), so that pytest-xdist's per-file
# scheduling (`--dist loadfile --no-loadscope-reorder`, pytest.ini) hands out the small files
# last and the workers end together. Files not listed (under a CPU-second each) go last.
LONGEST_FIRST = ["test_adaptive_eval.py", "test_faults.py", "test_defenses.py",
                 "test_distribution.py", "test_mixed_precision.py",
                 "test_adversarial_model.py", "test_training.py", "test_autoattack.py",
                 "test_models.py", "test_generalization.py", "test_evaluate.py",
                 "test_eval_attacks.py", "test_readme.py", "test_eval_analysis.py",
                 "test_classwise.py", "test_layers_ase_hff.py", "test_attacks_pgd.py",
                 "test_cli.py", "test_channels.py", "test_tuning.py", "test_memorization.py",
                 "test_versus_pytorch.py", "test_layers_cas_cifs.py", "test_attribution.py",
                 "test_bat.py", "test_data.py", "test_suite_cpu.py", "test_official_forms.py",
                 "test_xla.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file
