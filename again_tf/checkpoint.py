"""Atomic, resumable training state: weights with optimizer state, metrics log, best model.

Files in a run's folder:
    checkpoint/last.weights.h5   weights + optimizer state after the last good epoch
    checkpoint/best.weights.h5   weights of the epoch with the best monitored metric
    checkpoint/state.json        {"epoch", "best", "best_epoch", "interrupted"}
    metrics.json                 one dict of logged metrics per epoch
Every file is written to a temporary name and moved into place with `os.replace`, so
an interrupted write never leaves a half-written checkpoint behind.
"""

import contextlib
import json
import math
import os
import signal
import threading

import keras


def write_json(path, obj):
    """Writes `obj` as JSON to `path` atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Corrupt run file {path}: {e}") from None


@contextlib.contextmanager
def interrupts_deferred():
    """Holds back Ctrl-C (SIGINT) until the block ends, then raises KeyboardInterrupt.

    A KeyboardInterrupt raised inside h5py leaves the half-written file open, and the
    save on interrupt that follows could not write it again. Outside the main thread
    signals cannot be handled, so the block runs unprotected there.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def save_weights(model, path):
    """`model.save_weights(path)` (optimizer state included) atomically."""
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)


def save_model(model, path):
    """`model.save(path)` (a `.keras` file) atomically."""
    tmp = path[: -len(".keras")] + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def finite(logs):
    return all(math.isfinite(float(v)) for v in logs.values())


class Checkpointer(keras.callbacks.Callback):
    """Saves the training state at each epoch's end, atomically, skipping NaN epochs.

    Args:
        directory: the run's folder.
        monitor: the metric whose best value selects `best.weights.h5`
            (default "val_robust_accuracy"; higher is better). If it is not logged,
            the last epoch is the best.
    """

    def __init__(self, directory, monitor="val_robust_accuracy"):
        super().__init__()
        self.directory = directory
        self.ckpt_dir = os.path.join(directory, "checkpoint")
        os.makedirs(self.ckpt_dir, exist_ok=True)
        self.monitor = monitor
        self.state = read_json(self.path("state.json"), {"epoch": 0, "best": None})
        self.history = read_json(os.path.join(directory, "metrics.json"), [])
        self.nan_epoch = None

    def path(self, name):
        return os.path.join(self.ckpt_dir, name)

    @property
    def last(self):
        return self.path("last.weights.h5")

    @property
    def best(self):
        return self.path("best.weights.h5")

    def on_train_batch_end(self, batch, logs=None):
        if logs and not finite({k: v for k, v in logs.items() if k == "loss"}):
            self.nan_epoch = self.state["epoch"] + 1
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if self.nan_epoch is not None or not finite(logs):
            self.nan_epoch = epoch + 1
            self.model.stop_training = True
            return
        with interrupts_deferred():  # the epoch's files are written as one unit
            self.history = [h for h in self.history if h["epoch"] <= epoch] + [
                {"epoch": epoch + 1, **logs}]
            write_json(os.path.join(self.directory, "metrics.json"), self.history)
            save_weights(self.model, self.last)
            value = logs.get(self.monitor)
            if value is None or self.state.get("best") is None or value > self.state["best"]:
                save_weights(self.model, self.best)
                self.state.update(best=value, best_epoch=epoch + 1)
            self.state.update(epoch=epoch + 1, interrupted=False)
            write_json(self.path("state.json"), self.state)

    def save_interrupted(self):
        """On Ctrl-C: keeps the mid-epoch weights; resuming reruns the unfinished epoch."""
        with interrupts_deferred():  # a second Ctrl-C must not cut this save short
            save_weights(self.model, self.last)
            self.state["interrupted"] = True
            write_json(self.path("state.json"), self.state)
