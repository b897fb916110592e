"""Faults and bad input: a training process killed at chosen instants resumes to the
weights of an uninterrupted run; broken checkpoints, busy or unwritable folders, crafted
data files and out-of-range inputs each give one line (or work), never a silent result.

The killed runs are real `python train.py` processes (the kill is the point); the fault
is injected from outside the library by a launcher that wraps a few functions (Keras'
`save_weights`/`export`, `json.dump` of the checkpoint's state, `os.replace`) and kills
its own process at the chosen call, so normal runs carry no hook at all. The uninterrupted
reference run and every resume run in this process (one TensorFlow import).
"""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import checkpoint, data, models, training
from again_tf.attacks import APGD, PGD
from again_tf.defenses import AdversarialModel
from again_tf.training import RunError, TrainConfig
from helpers import sigint_as_a_terminal_sends_it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A fast deterministic run: 3 epochs of PGD-AT on 300 images (5 steps each).
TINY = dict(defense="pgd_at", model="small_cnn", width=4, train_size=300, val_size=100,
            epochs=3, batch_size=64, attack_steps=1, eval_steps=1, test_images=50,
            test_attacks=("clean", "pgd20"), seed=0)
TF_NOISE = ("WARNING: All log messages", "I0000", "W0000", "E0000")


def cli_args(cfg_dict, out):
    args = [f"--{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in cfg_dict.items()]
    return args + [f"--out_dir={out}", "--verbose=0"]


# Runs train.py with one function wrapped so that the process dies at the chosen call.
# FAULT = "<what>:<n>": the n-th (1-based) matching call triggers it.
LAUNCHER = textwrap.dedent("""
    import json, os, runpy, signal, sys
    what, nth = os.environ["FAULT"].split(":")
    nth, count = int(nth), [0]

    def due():
        count[0] += 1
        return count[0] == nth

    def die(sig=signal.SIGKILL):
        sys.stdout.flush(); sys.stderr.flush()
        os.kill(os.getpid(), sig)

    import keras
    from again_tf.defenses import AdversarialModel

    if what in ("sigint_first_step", "kill_first_step"):
        real_step = AdversarialModel.train_step
        def train_step(self, data):  # traced once, while the first step compiles
            if due():
                die(signal.SIGINT if what == "sigint_first_step" else signal.SIGKILL)
            return real_step(self, data)
        AdversarialModel.train_step = train_step
    elif what in ("kill_mid_weights", "kill_after_weights"):
        real_save = keras.Model.save_weights
        def save_weights(self, path, *a, **k):
            real_save(self, path, *a, **k)
            if "last" in os.path.basename(str(path)) and due():
                if what == "kill_mid_weights":  # what dying halfway through the write leaves
                    os.truncate(path, os.path.getsize(path) // 2)
                die()
        keras.Model.save_weights = save_weights
    elif what == "kill_in_state":
        real_dump = json.dump
        def dump(obj, f, *a, **k):
            if isinstance(obj, dict) and "best" in obj and "epoch" in obj and due():
                f.write(json.dumps(obj)[:20]); f.flush()  # a torn state file
                die()
            return real_dump(obj, f, *a, **k)
        json.dump = dump
    elif what == "kill_after_commit":
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            if os.path.basename(str(dst)) == "checkpoint" and due():
                die()
        os.replace = replace
    elif what == "kill_in_export":
        real_export = keras.Model.export
        def export(self, path, *a, **k):
            real_export(self, path, *a, **k)
            if due():
                die()
        keras.Model.export = export
    sys.argv = ["train.py"] + sys.argv[1:]
    runpy.run_path("train.py", run_name="__main__")
""")


def killed_run(out, fault):
    env = {**os.environ, "FAULT": fault, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cli_args(TINY, out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=sigint_as_a_terminal_sends_it)
    return proc


def committed_epoch(out):
    path = os.path.join(out, "checkpoint", "state.json")
    return json.load(open(path))["epoch"] if os.path.exists(path) else 0


def final_weights(out):
    return keras.models.load_model(os.path.join(out, "model.keras")).get_weights()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every resumed run must equal."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    result = training.train(TrainConfig(out_dir=out, verbose=0, **TINY))
    return out, result, final_weights(out)


# (fault, expected return code of the killed process, epochs committed when it died)
INSTANTS = [
    ("sigint_first_step:1", 130, 0),  # Ctrl-C while the first step compiles
    ("kill_mid_weights:2", -9, 1),    # epoch 2's weights file half written
    ("kill_in_state:2", -9, 1),       # after epoch 2's weights, its state.json torn
    ("kill_after_commit:2", -9, 2),   # epoch 2 committed, metrics not yet rewritten
    ("kill_in_export:1", -9, 3),      # training done, SavedModel written, not moved
]


@pytest.mark.parametrize("fault,code,committed", INSTANTS, ids=[i[0] for i in INSTANTS])
def test_killed_run_resumes_to_the_uninterrupted_weights(fault, code, committed, reference,
                                                         tmp_path):
    ref_out, ref_result, ref_weights = reference
    out = str(tmp_path / "run")
    proc = killed_run(out, fault)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert committed_epoch(out) == committed
    result = training.train(TrainConfig(out_dir=out, verbose=0, resume=True, **TINY))
    weights = final_weights(out)
    assert len(weights) == len(ref_weights)
    for got, want in zip(weights, ref_weights):
        np.testing.assert_array_equal(got, want)
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert history == json.load(open(os.path.join(ref_out, "metrics.json")))
    lines = open(os.path.join(out, "metrics.csv")).read().strip().splitlines()
    assert len(lines) == 1 + TINY["epochs"]
    same = ("clean", "pgd20", "epochs", "test_images")
    assert {k: result[k] for k in same} == {k: ref_result[k] for k in same}
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["epoch-0003"]


def test_resume_equals_an_uninterrupted_run_for_a_stateful_defense(tmp_path):
    """TRADES-AWP: a random normal start (the attack's generator), AWP's warm-up state and
    the weight perturbation; resumed after epoch 1 of 2 it must match bit for bit."""
    cfg = dict(TINY, defense="trades_awp", epochs=2, test_attacks=("clean",),
               defense_params={"awp_warmup": 1})
    training.train(TrainConfig(out_dir=str(tmp_path / "a"), verbose=0, **cfg))
    training.train(TrainConfig(out_dir=str(tmp_path / "b"), verbose=0, **dict(cfg, epochs=1)))
    training.train(TrainConfig(out_dir=str(tmp_path / "b"), verbose=0, resume=True, **cfg))
    for got, want in zip(final_weights(tmp_path / "b"), final_weights(tmp_path / "a")):
        np.testing.assert_array_equal(got, want)


def copy_run(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


def snapshot(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = f.read()
    return out


def resume(out, **changes):
    return training.train(TrainConfig(out_dir=out, verbose=0, resume=True,
                                      **dict(TINY, **changes)))


def one_line(e):
    text = str(e.value)
    assert "\n" not in text and len(text) < 400, text
    return text


@pytest.mark.parametrize("damage,message", [
    ("truncate", "last.weights.h5 cannot be loaded"),
    ("empty", "last.weights.h5 cannot be loaded"),
    ("delete_weights", "last.weights.h5 is missing"),
    ("epoch_two", "state.json is corrupt: 'epoch' is 'two'"),
    ("state_not_json", "state.json is unreadable"),
    ("delete_link", "checkpoint is missing but"),
    ("old_layout", "older again_tf version"),
])
def test_a_broken_checkpoint_stops_the_resume_with_one_line(damage, message, reference,
                                                            tmp_path):
    out = copy_run(reference[0], tmp_path / "run")
    unit = os.path.realpath(os.path.join(out, "checkpoint"))
    last = os.path.join(unit, "last.weights.h5")
    state_file = os.path.join(unit, "state.json")
    if damage in ("truncate", "empty"):
        size = os.path.getsize(last)
        os.remove(last)  # a new inode: best.weights.h5 is a hard link to the same file
        with open(last, "wb") as f:
            f.write(open(os.path.join(unit, "best.weights.h5"), "rb").read()[
                : size // 3 if damage == "truncate" else 0])
    elif damage == "delete_weights":
        os.remove(last)
    elif damage == "epoch_two":
        state = json.load(open(state_file))
        os.remove(state_file)
        json.dump(dict(state, epoch="two"), open(state_file, "w"))
    elif damage == "state_not_json":
        os.remove(state_file)
        open(state_file, "w").write('{"epoch": 3, "best"')
    elif damage == "delete_link":
        os.remove(os.path.join(out, "checkpoint"))
    elif damage == "old_layout":
        os.remove(os.path.join(out, "checkpoint"))
        shutil.copytree(unit, os.path.join(out, "checkpoint"))
    with pytest.raises(ValueError) as e:
        resume(out, epochs=4)
    assert message in one_line(e)


def test_changed_lr_on_resume_is_applied_and_reported(reference, tmp_path, capsys):
    out = copy_run(reference[0], tmp_path / "run")
    training.train(TrainConfig(out_dir=out, verbose=1, resume=True,
                               **dict(TINY, epochs=4, lr=0.004, test_attacks=("clean",))))
    said = capsys.readouterr().out
    assert "from epoch 4 on, training uses the changed --lr=0.004 (was 0.001)" in said
    adv = training.build(*training.resolve(TrainConfig(**TINY)))
    adv.compile(optimizer=keras.optimizers.Adam(0.5))
    adv.optimizer.build(adv.trainable_variables)
    adv.load_weights(os.path.join(out, "checkpoint", "last.weights.h5"))
    assert float(adv.optimizer.learning_rate.numpy()) == pytest.approx(0.004)
    assert int(adv.optimizer.iterations.numpy()) == 4 * 4  # 4 epochs of 4 steps (200/64)


@pytest.mark.parametrize("changes,message", [
    (dict(optimizer="sgd"), "holds adam state; --optimizer=sgd cannot continue it"),
    (dict(lr_schedule="cosine"), "--lr_schedule=constant, whose optimizer state"),
    (dict(epochs=2), "has trained more than --epochs=2"),
])
def test_a_resume_that_cannot_continue_is_refused_before_any_write(changes, message,
                                                                   reference, tmp_path):
    out = copy_run(reference[0], tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(RunError) as e:
        resume(out, **changes)
    assert message in one_line(e)
    assert snapshot(out) == before


def test_a_second_process_on_the_same_folder_is_refused(reference, tmp_path):
    out = copy_run(reference[0], tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         os.path.join(out, ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError) as e:
            resume(out)
        assert "is in use by another process" in one_line(e)
    finally:
        holder.kill()
        holder.wait()
    resume(out)  # the lock dies with its process


def test_ctrl_c_before_any_epoch_leaves_a_resumable_folder(tmp_path):
    """Interrupted before the first epoch ends, nothing but run.json is written."""
    out = str(tmp_path / "run")
    saver_calls = []

    class Stop(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            saver_calls.append(batch)
            raise KeyboardInterrupt

    real_fit = AdversarialModel.fit

    def fit(self, *args, callbacks=None, **kwargs):
        return real_fit(self, *args, callbacks=list(callbacks or []) + [Stop()], **kwargs)

    AdversarialModel.fit = fit
    try:
        with pytest.raises(KeyboardInterrupt):
            training.train(TrainConfig(out_dir=out, verbose=0, **dict(TINY, epochs=1)))
    finally:
        AdversarialModel.fit = real_fit
    assert saver_calls == [0]
    assert sorted(os.listdir(out)) == [".lock", "run.json"]
    training.train(TrainConfig(out_dir=out, verbose=0, resume=True,
                               **dict(TINY, epochs=1, test_attacks=("clean",))))
    assert checkpoint.read_state(out)["epoch"] == 1


def test_nan_in_the_first_epoch_names_no_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    monkeypatch.setattr(checkpoint, "finite", lambda logs: False)
    with pytest.raises(FloatingPointError) as e:
        training.train(TrainConfig(out_dir=out, verbose=0, **TINY))
    assert "no epoch finished, so no checkpoint was written" in str(e.value)
    assert "epoch 0" not in str(e.value)


# ------------------------------------------------------------------ data files


class Payload:
    """A pickle that, loaded with `pickle.loads`, creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_crafted_cifar_batch_runs_no_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = str(tmp_path / "code_ran")
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]},
                        protocol=2)
    for name in ["data_batch_1"] + [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (folder / name).write_bytes(good)
    (folder / "data_batch_1").write_bytes(pickle.dumps(
        {b"data": Payload(marker), b"labels": [1]}, protocol=2))
    with pytest.raises(ValueError) as e:
        data.load_arrays("cifar10", "train", data_dir=tmp_path)
    assert not os.path.exists(marker)
    assert ".mkdir, which a CIFAR batch never does" in str(e.value)
    assert "data_batch_1" in str(e.value)
    x, y = data.load_arrays("cifar10", "test", data_dir=tmp_path)  # real batches still load
    assert x.shape == (2, 32, 32, 3) and list(y) == [1, 2]
    # A NumPy 2 pickle (protocol 5) of the same batch loads as well.
    (folder / "test_batch").write_bytes(pickle.dumps(
        {b"data": np.full((1, 3072), 7, np.uint8), b"labels": [np.int64(3)]}, protocol=5))
    data.clear_cache()
    x, y = data.load_arrays("cifar10", "test", data_dir=tmp_path)
    assert x.max() == 7 and list(y) == [3]


def test_training_epochs_depend_on_seed_and_epoch_alone():
    """What makes a resume exact: epoch k's batches (order and crops) are the same whether
    the pipeline starts at epoch 0 or at k, in whatever process state."""
    x = np.random.default_rng(0).uniform(size=(10, 8, 8, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(10)))

    def batches(first, global_seed):
        tf.random.set_seed(global_seed)
        return list(data.training_epochs(ds, 4, seed=5, epochs=3, first_epoch=first,
                                         augment="crop_flip").as_numpy_iterator())

    full, resumed = batches(0, 1), batches(2, 99)
    assert len(full) == 9 and len(resumed) == 3
    for (xa, ya), (xb, yb) in zip(full[6:], resumed):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    orders = [np.concatenate([y for _, y in full[3 * e:3 * e + 3]]) for e in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_a_mistyped_data_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    typo = tmp_path / "fashoin"
    attempts = []  # a fallback to a download would connect somewhere: fail fast instead

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("this test has no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(FileNotFoundError) as e:
        data.load_arrays("mnist", "test", data_dir=typo)
    assert f"data_dir {typo} does not exist" in str(e.value)
    assert not attempts and not typo.exists()
    with pytest.raises(FileNotFoundError):
        data.load_arrays("fashion_mnist", "test", data_dir=typo)  # no Debian fallback


# ------------------------------------------------------------- inputs at the boundary


@pytest.fixture(scope="module")
def tiny_net():
    keras.utils.set_random_seed(0)
    net = models.build("small_cnn", 10, width=4)
    net.build((None, 28, 28, 1))
    return net


IMAGES = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype("float32")


@pytest.mark.parametrize("x,y,message", [
    ((IMAGES * 255).astype(np.uint8), [0, 1, 2, 3], "uint8 images; expected float images "
                                                    "in [0, 1] (divide by 255)"),
    (IMAGES * 255, [0, 1, 2, 3], "values up to 2"),
    (np.where(IMAGES > 0.5, np.nan, IMAGES), [0, 1, 2, 3], "NaN or infinite"),
    (IMAGES - 0.5, [0, 1, 2, 3], "values down to -0."),
    (IMAGES, [0, 1, 2, 10], "labels in [0, 10]; the model has 10 classes"),
    (IMAGES, [-1, 1, 2, 3], "expected labels in [0, 10)"),
    (IMAGES, np.eye(10)[:4], "one-hot labels"),
])
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_attacks_refuse_bad_images_and_labels(attack, x, y, message, tiny_net):
    atk = (PGD(tiny_net, 0.1, 0.025, steps=1) if attack == "pgd"
           else APGD(tiny_net, 0.1, n_iter=1))
    with pytest.raises(ValueError) as e:
        atk(x, np.asarray(y))
    assert message in one_line(e)


def test_attacks_and_adversarial_model_warn_once_on_probabilities(tiny_net):
    soft = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10, activation="softmax")])
    with pytest.warns(UserWarning, match="look like probabilities"):
        PGD(soft, 0.1, 0.025, steps=1)(IMAGES, np.arange(4))
    adv = AdversarialModel(soft, defense="pgd_at", eps=0.1, steps=1, eval_steps=0)
    adv.build((None, 28, 28, 1))
    adv.compile(optimizer="adam")
    with pytest.warns(UserWarning, match="look like probabilities"):
        adv.fit(IMAGES, np.arange(4), epochs=1, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PGD(tiny_net, 0.1, 0.025, steps=1)(IMAGES, np.arange(4))  # logits: no warning
    assert not [w for w in caught if "probabilities" in str(w.message)]


def test_adversarial_model_refuses_bad_batches(tiny_net):
    adv = AdversarialModel(tiny_net, defense="pgd_at", eps=0.1, steps=1, eval_steps=1)
    adv.compile(optimizer="adam")
    with pytest.raises(ValueError, match="divide by 255"):
        adv.fit(IMAGES * 255, np.arange(4), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"expected labels in \[0, 10\)"):
        adv.fit(IMAGES, np.array([0, 1, 2, 12]), epochs=1, verbose=0)
    # Datasets are checked in the compiled step, batch by batch.
    bad = tf.data.Dataset.from_tensor_slices((IMAGES * 255, np.arange(4))).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="divide by 255"):
        adv.fit(bad, epochs=1, verbose=0)
    bad = tf.data.Dataset.from_tensor_slices((IMAGES, np.array([0, 1, 2, 11]))).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="model has 10 classes"):
        adv.evaluate(bad, verbose=0)
    bad = tf.data.Dataset.from_tensor_slices((IMAGES - 0.5, np.arange(4))).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="images hold negative values"):
        adv.fit(bad, epochs=1, verbose=0)
    bad = tf.data.Dataset.from_tensor_slices((IMAGES, np.array([0, -1, 2, 3]))).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative labels"):
        adv.evaluate(bad, verbose=0)
    uint8 = tf.data.Dataset.from_tensor_slices(((IMAGES * 255).astype(np.uint8),
                                                np.arange(4))).batch(2)
    with pytest.raises(ValueError, match="uint8 images"):
        adv.fit(uint8, epochs=1, verbose=0)
    # Nothing attacked (`none`, no validation attack): any finite features train, as in
    # plain Keras (the memorization estimates use this); NaN is still refused.
    plain = AdversarialModel(tiny_net, defense="none", eval_steps=0)
    plain.compile(optimizer="adam")
    plain.fit(IMAGES * 255 - 10, np.arange(4), epochs=1, verbose=0)
    nan = tf.data.Dataset.from_tensor_slices((IMAGES * np.nan, np.arange(4))).batch(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN"):
        plain.fit(nan, epochs=1, verbose=0)


# ------------------------------------------------------------------- command lines


def mount_tmpfs(path, options):
    """Mounts a tmpfs (root only); False where this machine does not allow it."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disks(tmp_path):
    """A read-only folder and a 400 KiB one (a full disk for a checkpoint)."""
    readonly, full = tmp_path / "readonly", tmp_path / "full"
    mounted = [p for p, o in ((readonly, "ro,size=64k"), (full, "size=400k"))
               if mount_tmpfs(p, o)]
    yield (readonly if readonly in mounted else None), (full if full in mounted else None)
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


# Runs command-line cases through each script's main() in one process: flags are
# dropped and defined again for each script; os._exit (train.py's exit after a failed
# write) becomes SystemExit so the loop goes on. A process of its own, not the test's: the
# full-disk case leaves h5py a half-written file on the tmpfs, and run through main() in the
# test process (2026-12-08) that process died of SIGSEGV in one of two runs.
CLI_LOOP = textwrap.dedent("""
    import contextlib, io, json, os, runpy, sys
    from absl import flags, logging
    os._exit = lambda code: sys.exit(code)
    absl_own = set(flags.FLAGS)
    results = []
    for script, argv in json.loads(sys.argv[1]):
        for name in set(flags.FLAGS) - absl_own:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()
        module = runpy.run_path(script, run_name="cli_case")
        err, out = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                flags.FLAGS([script] + argv)
                module["main"]([script])
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = 1 if isinstance(e.code, str) else (e.code or 0)
            except BaseException as e:
                print(f"UNCAUGHT {type(e).__name__}: {e}", file=sys.stderr)
                code = 99
        results.append([code, err.getvalue(), out.getvalue()])
    print("RESULTS" + json.dumps(results))
""")


def test_command_line_bad_input_gives_one_line(tmp_path, small_disks, tiny_net):
    readonly, full = small_disks
    model_file = str(tmp_path / "m.keras")
    tiny_net.save(model_file)
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(open(model_file, "rb").read()[:1000])
    common = ["--train_size=300", "--val_size=100", "--model=small_cnn", "--width=4",
              "--epochs=1", "--attack_steps=1", "--eval_steps=1", "--verbose=0"]
    out = str(tmp_path / "o")
    cases = [
        ("train.py", ["--eval_steps=-1", f"--out_dir={out}"],
         "--eval_steps=-1 must be >= 0"),
        ("train.py", ["--test_images=-5", f"--out_dir={out}"],
         "--test_images=-5 must be at least 1"),
        ("train.py", ["--lr_milestones=a,b", f"--out_dir={out}"],
         "--lr_milestones=a,b: expected integers"),
        ("train.py", ["--defense=trades", "--defense_params=beta=abc", f"--out_dir={out}"],
         "--defense_params=beta=abc for --defense=trades"),
        ("train.py", ["--dataset=mnist", f"--data_dir={tmp_path}/mnsit", f"--out_dir={out}"],
         f"data_dir {tmp_path}/mnsit does not exist"),
        ("evaluate.py", [f"--model_path={corrupt}", "--attacks=clean", "--num_images=10"],
         "cannot load the model: the file is corrupt or truncated (a .keras file is a zip"),
        ("tune.py", ["--max_trials=0", f"--out_dir={out}"], "--max_trials=0 must be at least 1"),
    ]
    if readonly is not None:
        cases += [
            ("train.py", common + [f"--out_dir={readonly}/run"],
             f"--out_dir={readonly}/run cannot be written: Read-only file system"),
            ("tune.py", [f"--out_dir={readonly}/t", "--train_size=300", "--val_size=100"],
             f"--out_dir={readonly}/t cannot be written: Read-only file system"),
            ("evaluate.py", [f"--model_path={model_file}", f"--report={readonly}/r.json",
                             "--attacks=clean", "--num_images=10"],
             f"--report {readonly}/r.json cannot be written (Read-only file system)"),
        ]
    if full is not None:
        cases.append(("train.py", common + [f"--out_dir={full}/run"],
                      "No space left on device"))
    proc = subprocess.run([sys.executable, "-c", CLI_LOOP, json.dumps(
        [[script, argv] for script, argv, _ in cases])], cwd=ROOT, capture_output=True,
        text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for (script, argv, message), (code, err, _) in zip(cases, results):
        lines = [line for line in err.splitlines()
                 if line.strip() and not line.startswith(TF_NOISE)]
        if "No space left" in message:
            # train.py leaves with os._exit right after its line (a real process, checked
            # by hand, prints nothing else); here the loop goes on and h5py's clean-up of
            # the half-written file reports itself.
            lines = lines[:1] + [line for line in lines[1:] if "h5py" not in err]
        assert code not in (0, 99), (script, argv, err[-2000:])
        assert len(lines) == 1 and message in lines[0], (script, argv, err[-2000:])
        assert lines[0].startswith(f"{script}: error:"), lines
    assert not os.path.exists(out)
    if full is not None:  # the folder still resumes once there is room: nothing half-made
        assert checkpoint.read_state(f"{full}/run") is None
