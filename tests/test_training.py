"""A run's life: CLI errors, out_dir protection, atomic checkpoints, resume, NaN, export."""

import glob
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from again_tf import checkpoint, training
from again_tf.defenses import PGDAT, registry
from again_tf.training import RunError, TrainConfig
from helpers import load_script, run_main, serve_saved_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run's life does not depend on the network: the small CNN traces in seconds, where the
# default PreAct ResNet-18 takes a minute (the main job itself runs in test_cli_trains_end_to_end).
SMALL = dict(model="small_cnn", width=4, train_size=640, val_size=128, test_images=64, attack_steps=2, eval_steps=2,
             batch_size=64, verbose=0)


def run_cli(*args, script="train.py"):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def files(directory):
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            out[p] = os.path.getmtime(p)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "a")
    result = training.train(TrainConfig(epochs=2, out_dir=out, **SMALL))
    return out, result


def test_run_writes_everything_atomically(finished_run):
    out, result = finished_run
    for name in ("run.json", "metrics.csv", "metrics.json", "results.json", "model.keras",
                 "best.keras", "saved_model/saved_model.pb", "checkpoint/last.weights.h5",
                 "checkpoint/best.weights.h5", "checkpoint/state.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert not [p for p in files(out) if ".tmp" in p]
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert [h["epoch"] for h in history] == [1, 2]
    # The default defense (again_pgd) masks by the true labels in training: the log says so.
    assert {"loss", "adv_accuracy_label_masked", "val_accuracy",
            "val_robust_accuracy"} <= set(history[0])
    assert "adv_accuracy" not in history[0]
    state = json.load(open(os.path.join(out, "checkpoint/state.json")))
    best = max(history, key=lambda h: h["val_robust_accuracy"])
    assert state["epoch"] == 2 and state["best"] == pytest.approx(best["val_robust_accuracy"])
    assert set(result) >= {"clean", "pgd20"} and 0 <= result["pgd20"] <= result["clean"] <= 1


def test_export_serves_the_same_predictions_in_a_fresh_process(finished_run, tmp_path):
    out, _ = finished_run
    import keras

    from again_tf import data
    x = data.load_arrays("fashion_mnist", "test[:32]")[0].astype(np.float32) / 255
    served = serve_saved_model(os.path.join(out, "saved_model"), x, tmp_path / "y.npy")
    keras_logits = keras.models.load_model(os.path.join(out, "model.keras"))(x)
    np.testing.assert_allclose(served, keras_logits, atol=1e-4)


def test_out_dir_holding_a_run_is_refused_and_untouched(finished_run):
    out, _ = finished_run
    before = files(out)
    with pytest.raises(RunError, match="holds a run already.*--resume"):
        training.train(TrainConfig(epochs=3, out_dir=out, **SMALL))
    with pytest.raises(RunError, match="--defense"):
        training.train(TrainConfig(defense="none", epochs=3, out_dir=out, resume=True, **SMALL))
    assert files(out) == before


def test_resume_continues_from_the_last_epoch(tmp_path):
    out = str(tmp_path / "r")
    small = dict(SMALL, test_attacks=("clean",))  # the test-set attack is not the point here
    training.train(TrainConfig(epochs=1, out_dir=out, **small))
    first = checkpoint.read_json(os.path.join(out, "checkpoint/state.json"))
    result = training.train(TrainConfig(epochs=2, out_dir=out, resume=True, **small))
    second = checkpoint.read_json(os.path.join(out, "checkpoint/state.json"))
    history = json.load(open(os.path.join(out, "metrics.json")))
    assert first["epoch"] == 1 and [h["epoch"] for h in history] == [1, 2]
    # The run's training time sums its epochs over both processes.
    assert 0 < first["train_seconds"] < second["train_seconds"]
    assert result["train_seconds"] == round(second["train_seconds"], 1)
    lines = open(os.path.join(out, "metrics.csv")).read().strip().splitlines()
    assert len(lines) == 3  # header + one row per epoch, appended on resume
    import keras
    adv = training.build(*training.resolve(TrainConfig(out_dir=out, **SMALL)))
    adv.compile(optimizer=keras.optimizers.Adam())
    adv.optimizer.build(adv.trainable_variables)
    adv.load_weights(os.path.join(out, "checkpoint/last.weights.h5"))
    assert int(adv.optimizer.iterations.numpy()) == 2 * (512 // 64)  # optimizer state resumed


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler during the test, however this process was started
    (`nohup ... &` starts it ignoring SIGINT)."""
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, started_with)


def test_ctrl_c_during_the_epoch_save_waits_for_the_files(tmp_path, python_sigint_handler):
    """SIGINT arriving mid-write: the epoch's files complete, then KeyboardInterrupt."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.set_model(model)
    real_save = model.save_weights

    def save_interrupted_midway(path):
        os.kill(os.getpid(), signal.SIGINT)  # delivered while the h5 file is being written
        real_save(path)

    model.save_weights = save_interrupted_midway
    with pytest.raises(KeyboardInterrupt):
        saver.on_epoch_end(0, {"loss": 1.0})
    state = checkpoint.read_json(saver.path("state.json"))
    assert state["epoch"] == 1 and not state["interrupted"]
    model.save_weights = real_save
    saver.save_interrupted()  # the file the interrupted write used is free again
    fresh = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    fresh.load_weights(saver.last)
    np.testing.assert_array_equal(fresh.get_weights()[0], model.get_weights()[0])
    assert checkpoint.read_json(saver.path("state.json"))["interrupted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # A process that ignores SIGINT keeps ignoring it through a save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with checkpoint.interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


class NanAfter(PGDAT):
    """PGD-AT whose loss becomes NaN from its 12th train step on (in epoch 2 of 8 steps)."""

    name = "nan_after"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps_done = keras.Variable(0, trainable=False, dtype="int32")

    def loss(self, model, x, x_adv, y):
        per, logits = super().loss(model, x, x_adv, y)
        per = per * tf.where(self.steps_done >= 12, float("nan"), 1.0)
        self.steps_done.assign_add(1)
        return per, logits


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    registry.register("nan_after", NanAfter)
    out = str(tmp_path / "n")
    with pytest.raises(FloatingPointError, match="NaN in epoch 2.*epoch 1"):
        training.train(TrainConfig(defense="nan_after", epochs=3, out_dir=out, **SMALL))
    state = checkpoint.read_json(os.path.join(out, "checkpoint/state.json"))
    assert state["epoch"] == 1
    import h5py
    with h5py.File(os.path.join(out, "checkpoint/last.weights.h5")) as f:
        arrays = []
        f.visititems(lambda n, o: arrays.append(o[()]) if isinstance(o, h5py.Dataset) else None)
    assert arrays and all(np.all(np.isfinite(a)) for a in arrays if a.dtype.kind == "f")


@pytest.mark.parametrize("args,message", [
    (["--defense=bogus"], "--defense='bogus' is unknown. Expected one of: none, pgd_at"),
    (["--dataset=imagenet"], "Unknown dataset 'imagenet'"),
    (["--model=vgg"], "--model='vgg' is unknown"),
    (["--eps=8"], "--eps=8.0 is outside (0, 1]"),
    (["--eps=abc"], "--eps='abc' is not a number"),
    (["--model=wrn34_10", "--width=8"], "--width=8 applies to --model=small_cnn/resnet18/preact_resnet18 only"),
    (["--defense_params=gamma=1"], "takes no hyper-parameter"),
    (["--data_dir=/nonexistent", "--dataset=cifar10"], "cifar10"),
])
def test_cli_bad_input_gives_one_clear_line(args, message, tmp_path):
    out = run_main("train.py", *args, f"--out_dir={tmp_path}/o", "--epochs=1")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and message in last, out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o")


def test_cli_trains_end_to_end(tmp_path):
    out = run_cli("--epochs=1", "--train_size=256", "--val_size=64", "--test_images=32",
                  "--attack_steps=2", "--eval_steps=2", "--width=4", "--verbose=2",
                  f"--out_dir={tmp_path}/cli")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pgd20" in out.stdout and "again_pgd" in out.stdout  # the default defense
    again = run_main("train.py", "--epochs=1", f"--out_dir={tmp_path}/cli")
    assert again.returncode != 0 and "holds a run already" in again.stderr


def test_ctrl_c_saves_and_resume_finishes(tmp_path, python_sigint_handler):
    """SIGINT mid-run, sent as a terminal sends it (to the process, from outside the training
    thread) once the first epoch is committed: state saved, exit 130; --resume then completes
    the run. Through train.py's main in this process; a real process' exit code 130 is
    tests/test_faults.py's sigint_first_step case."""
    import threading

    out = tmp_path / "int"
    args = ["--epochs=30", "--train_size=640", "--val_size=128", "--test_images=64",
            "--attack_steps=2", "--eval_steps=2", "--width=4", "--model=small_cnn",
            "--test_attacks=clean", "--verbose=0", f"--out_dir={out}"]

    returned = threading.Event()

    def interrupt_after_the_first_epoch():
        while not (out / "metrics.json").exists():
            if returned.wait(0.05):
                return  # the run ended by itself: a SIGINT now would hit the test, not the run
        os.kill(os.getpid(), signal.SIGINT)

    terminal = threading.Thread(target=interrupt_after_the_first_epoch, daemon=True)
    terminal.start()
    try:
        interrupted = run_main("train.py", *args)
    finally:
        returned.set()
        terminal.join()
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "rerun with --resume to continue" in interrupted.stdout
    state = checkpoint.read_json(str(out / "checkpoint/state.json"))
    assert state["interrupted"] and 1 <= state["epoch"] < 30
    done = run_main("train.py", *(a for a in args if not a.startswith("--epochs")),
                    f"--epochs={state['epoch'] + 1}", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    history = json.load(open(out / "metrics.json"))
    assert [h["epoch"] for h in history] == list(range(1, state["epoch"] + 2))


def test_every_recipe_flagfile_parses_and_validates(monkeypatch):
    """flags/*.cfg: known flags, valid values and defense parameters (what train.py checks
    before it writes anything). BAT's recipes may only miss their scores file."""
    from absl import flags

    monkeypatch.chdir(ROOT)  # the recipes name each other relative to the project
    train = load_script("train.py")
    paths = sorted(glob.glob("flags/*.cfg"))
    for path in paths:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train.py", f"--flagfile={path}"])
        cfg = train["config_from_flags"]()
        try:
            training.validate(cfg)
        except ValueError as e:
            assert "memorization_scores=" in str(e) and "does not exist" in str(e), (path, e)
    assert len(paths) >= 30


def test_each_epochs_validation_shows_a_progress_bar(capsys):
    # Keras runs fit's validation silently; the callback train.py adds shows it per epoch.
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    net.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    net.fit(x, y, batch_size=4, epochs=2, validation_data=(x[:6], y[:6]), verbose=0,
            callbacks=[training.ValidationProgress(steps=2, attacked=True)])
    out = capsys.readouterr().out
    assert out.count("Validation (clean and PGD robust accuracy):") == 2
    assert out.count("2/2") >= 2
