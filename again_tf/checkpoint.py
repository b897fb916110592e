"""Resumable training state, committed one epoch at a time as one unit.

Files in a run's folder:
    checkpoint -> checkpoints/epoch-0007   a symbolic link to the committed unit:
        last.weights.h5   weights + optimizer state after the unit's epoch
        best.weights.h5   weights of the epoch with the best monitored metric
        state.json        {"epoch", "best", "best_epoch", "interrupted", "history" (one
                          dict of logged metrics per epoch), "optimizer" (the settings the
                          optimizer state was made with), "seeds" (the states of the
                          attacks' random generators, which no weights file holds)}
    metrics.json, metrics.csv   copies of the committed history, rewritten after each commit
    .lock                       held (flock) by the process training in the folder

An epoch's unit is written in full into `checkpoints/next.tmp/`, renamed, and committed by
replacing the `checkpoint` link with `os.replace`, one atomic rename: whenever a process
dies, `checkpoint` names either the previous unit or the new one, each complete. Why
not `tf.train.CheckpointManager` or `keras.callbacks.BackupAndRestore`: the manager
commits one checkpoint, but the unit here also holds the best weights, the metrics rows
and the epoch, in Keras' own `.weights.h5` format that `load_weights` checks shape by
shape; BackupAndRestore writes its weights and its epoch file one after the other, the
very gap this module closes.
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import threading
import time

import keras
import numpy as np

# The link naming the committed unit, and the folder of the units.
LINK = "checkpoint"
UNITS = "checkpoints"
_NEXT = "next.tmp"


class CheckpointError(ValueError):
    """A run folder's checkpoint cannot be used; the message says why in one line."""


def write_json(path, obj):
    """Writes `obj` as JSON to `path` atomically."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Corrupt run file {path}: {e}") from None


@contextlib.contextmanager
def interrupts_deferred():
    """Holds back Ctrl-C (SIGINT) until the block ends, then raises KeyboardInterrupt.

    A KeyboardInterrupt raised inside h5py leaves the half-written file open, and the
    save on interrupt that follows could not write it again. Outside the main thread
    signals cannot be handled, so the block runs unprotected there. A process that
    ignores SIGINT (started with `nohup ... &`) keeps ignoring it.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
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
    try:
        model.save_weights(tmp)
        _fsync(tmp)
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


def save_model(model, path):
    """`model.save(path)` (a `.keras` file) atomically."""
    tmp = path[: -len(".keras")] + ".tmp.keras"
    try:
        model.save(tmp)
        _fsync(tmp)
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


def finite(logs):
    return all(math.isfinite(float(v)) for v in logs.values())


def _fsync(path):
    """Flushes a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def _link_or_copy(src, dst):
    """A second name for an immutable file (a copy where hard links are not supported)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ------------------------------------------------------------------------------ lock

_LOCKS = {}


def lock(directory):
    """Takes the run folder's lock, or raises CheckpointError if another process has it.

    An exclusive `flock` on `directory/.lock`, released by `unlock` or when the process
    ends (also when it is killed), so a stale lock never blocks a later run.
    """
    key = os.path.realpath(directory)
    if key in _LOCKS:
        raise CheckpointError(f"--out_dir={directory} is already in use by this process")
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise CheckpointError(f"--out_dir={directory} is in use by another process (a "
                                  f"run or a --resume of it is still going): wait for it to "
                                  f"end or stop it") from None
        raise
    _LOCKS[key] = fd


def unlock(directory):
    fd = _LOCKS.pop(os.path.realpath(directory), None)
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------- committed state


def _is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _state_problem(state):
    """What is wrong with a unit's state.json, or None."""
    if not isinstance(state, dict):
        return f"expected a JSON object, found {type(state).__name__}"
    epoch = state.get("epoch")
    if not _is_int(epoch, 1):
        return f"'epoch' is {epoch!r}, expected an integer >= 1"
    best_epoch = state.get("best_epoch")
    if not (_is_int(best_epoch, 1) and best_epoch <= epoch):
        return f"'best_epoch' is {best_epoch!r}, expected an integer in [1, {epoch}]"
    best = state.get("best")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        return f"'best' is {best!r}, expected a number or null"
    history = state.get("history")
    if (not isinstance(history, list) or not all(isinstance(h, dict) for h in history)
            or [h.get("epoch") for h in history] != list(range(1, epoch + 1))):
        return f"'history' does not hold one row for each of the epochs 1..{epoch}"
    seeds = state.get("seeds")
    if not isinstance(seeds, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(_is_int(i, -2**63) for i in v)
            for v in seeds.values()):
        return "'seeds' is not a mapping of names to two integers"
    if not isinstance(state.get("optimizer"), dict):
        return "'optimizer' is missing"
    return None


def read_state(directory):
    """The committed state of the run in `directory`, or None if no epoch was committed.

    Raises CheckpointError (one line naming the file) for a link to a missing unit, a
    unit missing a file, a corrupt state.json, or a folder of an older again_tf.
    """
    link = os.path.join(directory, LINK)
    if not os.path.lexists(link):
        if os.path.exists(os.path.join(directory, "metrics.json")):
            raise CheckpointError(f"{link} is missing but {directory}/metrics.json lists "
                                  f"finished epochs: the checkpoint was deleted; start a new "
                                  f"run in another --out_dir")
        return None
    if not os.path.islink(link):
        raise CheckpointError(f"{link} is a folder of an older again_tf version, which did not "
                              f"commit its files as one unit; it cannot be resumed exactly: "
                              f"start a new run in another --out_dir")
    unit = os.path.join(directory, os.readlink(link))
    for name in ("state.json", "last.weights.h5", "best.weights.h5"):
        path = os.path.join(link, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing ({link} points to {unit}): the "
                                  f"checkpoint cannot be resumed")
    path = os.path.join(link, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"{path} is corrupt: {problem}")
    return state


def write_metrics(directory, history):
    """metrics.json and metrics.csv (one row per epoch, epochs from 1) of `history`."""
    write_json(os.path.join(directory, "metrics.json"), history)
    keys = sorted({k for h in history for k in h if k != "epoch"})
    lines = [",".join(["epoch"] + keys)]
    lines += [",".join([str(h["epoch"])] + [repr(h[k]) if k in h else "" for k in keys])
              for h in history]
    tmp = os.path.join(directory, "metrics.csv.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, "metrics.csv"))


# ---------------------------------------------------------------- random generators


def seed_generators(root):
    """`{path: keras.random.SeedGenerator}` reachable from `root`, in a fixed order.

    No weights file holds a generator's state (Keras saves none), so the attacks' random
    starts and a layer's dropout masks would restart from their seeds on resume. This
    walks Keras layers (their public attributes, sub-layers and own generators) and the
    again_tf objects they hold (attacks, defense pieces), lists, tuples and dicts.
    """
    found, seen = {}, set()

    def walk(obj, path):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, keras.random.SeedGenerator):
            found[path] = obj
            return
        if isinstance(obj, dict):
            items = [(str(k), v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            items = list(enumerate(obj))
        elif isinstance(obj, keras.layers.Layer):
            items = [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
            items += [("_layers", getattr(obj, "_layers", [])),
                      ("_seed_generators", getattr(obj, "_seed_generators", []))]
        elif type(obj).__module__.startswith("again_tf") and hasattr(obj, "__dict__"):
            items = [(k, v) for k, v in vars(obj).items() if not k.startswith("_")]
        else:
            return
        for key, value in items:
            walk(value, f"{path}.{key}")

    walk(root, "model")
    return found


def seed_states(root):
    return {path: [int(v) for v in np.asarray(g.state.value).reshape(-1)]
            for path, g in seed_generators(root).items()}


def restore_seed_states(root, states):
    """Sets the generators of `root` to `states`; raises CheckpointError on a mismatch."""
    generators = seed_generators(root)
    if set(generators) != set(states):
        raise CheckpointError(f"the random generators of the model ({len(generators)}) do not "
                              f"match those of the checkpoint ({len(states)})")
    for path, g in generators.items():
        g.state.assign(np.asarray(states[path], dtype=g.state.dtype))


# ------------------------------------------------------------------------ callback


class Checkpointer(keras.callbacks.Callback):
    """Commits the training state at each epoch's end as one unit, skipping NaN epochs.

    Args:
        directory: the run's folder.
        monitor: the metric whose best value selects `best.weights.h5`
            (default "val_robust_accuracy"; higher is better). If it is not logged,
            the last epoch is the best.
        settings: what the optimizer state depends on (optimizer, learning-rate
            schedule...), recorded in each unit so a resume can tell what changed.

    Each unit also records `train_seconds`, the wall time of the committed epochs summed
    over every process that trained them (an interrupted epoch's time is not counted).
    """

    def __init__(self, directory, monitor="val_robust_accuracy", settings=None):
        super().__init__()
        self.directory = directory
        self.ckpt_dir = os.path.join(directory, LINK)
        self.units_dir = os.path.join(directory, UNITS)
        self.monitor = monitor
        self.settings = dict(settings or {})
        self.state = read_state(directory) or {
            "epoch": 0, "best": None, "best_epoch": None, "interrupted": False,
            "history": [], "optimizer": self.settings, "seeds": {}}
        self.nan_epoch = None

    @property
    def history(self):
        return self.state["history"]

    def path(self, name):
        return os.path.join(self.ckpt_dir, name)

    @property
    def last(self):
        return self.path("last.weights.h5")

    @property
    def best(self):
        return self.path("best.weights.h5")

    def restore(self, model):
        """Loads the committed unit into `model` (built, compiled); returns its epoch.

        Also drops what a killed process left uncommitted and rewrites the metrics files
        from the unit, so rows of an epoch that was not committed disappear. Raises
        CheckpointError (one line naming the file) if the weights cannot be loaded.
        """
        if self.state["epoch"] == 0:
            self.tidy()
            return 0
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(self.last)
        except Exception as e:  # h5py's OSError for a truncated file, shape mismatches...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{self.last} cannot be loaded ({type(e).__name__}: "
                                  f"{first[:200]}); the checkpoint cannot be resumed") from None
        expected = self.state.get("iterations")
        if expected is not None and model.optimizer is not None and int(
                np.asarray(model.optimizer.iterations)) != expected:
            # Keras skips, with a mere warning, an optimizer state whose variables differ.
            raise CheckpointError(f"{self.last}: its optimizer state was not loaded (its "
                                  f"variables differ from this optimizer's); resume with the "
                                  f"run's optimizer settings")
        restore_seed_states(model, self.state["seeds"])
        self.tidy()
        write_metrics(self.directory, self.history)
        return self.state["epoch"]

    def tidy(self):
        """Removes the units and temporary files that are not the committed unit."""
        current = (os.path.basename(os.readlink(self.ckpt_dir))
                   if os.path.islink(self.ckpt_dir) else None)
        if os.path.isdir(self.units_dir):
            for name in os.listdir(self.units_dir):
                if name != current:
                    shutil.rmtree(os.path.join(self.units_dir, name), ignore_errors=True)
        for name in (LINK + ".tmp", "metrics.json.tmp", "metrics.csv.tmp", "run.json.tmp",
                     "results.json.tmp", "model.tmp.keras", "best.tmp.keras"):
            _remove(os.path.join(self.directory, name))

    def on_train_batch_end(self, batch, logs=None):
        if logs and not finite({k: v for k, v in logs.items() if k == "loss"}):
            self.nan_epoch = self.state["epoch"] + 1
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.monotonic() - getattr(self, "_epoch_started", time.monotonic())
        logs = {k: float(v) for k, v in (logs or {}).items()}
        if self.nan_epoch is not None or not finite(logs):
            self.nan_epoch = epoch + 1
            self.model.stop_training = True
            return
        with interrupts_deferred():  # the epoch's unit is written and committed whole
            value = logs.get(self.monitor)
            improved = (value is None or self.state.get("best") is None
                        or value > self.state["best"])
            optimizer = getattr(self.model, "optimizer", None)
            state = dict(self.state, epoch=epoch + 1, interrupted=False,
                         train_seconds=self.state.get("train_seconds", 0.0) + seconds,
                         optimizer=self.settings, seeds=seed_states(self.model),
                         iterations=None if optimizer is None
                         else int(np.asarray(optimizer.iterations)),
                         history=[h for h in self.history if h["epoch"] <= epoch]
                         + [{"epoch": epoch + 1, **logs}])
            if improved:
                state.update(best=value, best_epoch=epoch + 1)
            self._commit(state, new_weights=True, new_best=improved)

    def save_interrupted(self):
        """On Ctrl-C: marks the committed unit interrupted; the unfinished epoch is rerun
        from it on resume, as an uninterrupted run would have run it."""
        if self.state["epoch"] == 0:
            return  # nothing was committed: a resume starts from the first epoch
        with interrupts_deferred():  # a second Ctrl-C must not cut this save short
            self._commit(dict(self.state, interrupted=True), new_weights=False,
                         new_best=False)

    def _commit(self, state, new_weights, new_best):
        previous = self.ckpt_dir if self.state["epoch"] else None
        os.makedirs(self.units_dir, exist_ok=True)
        unit = os.path.join(self.units_dir, _NEXT)
        shutil.rmtree(unit, ignore_errors=True)
        os.makedirs(unit)
        last = os.path.join(unit, "last.weights.h5")
        if new_weights:
            self.model.save_weights(last)
            _fsync(last)
        else:
            _link_or_copy(os.path.join(previous, "last.weights.h5"), last)
        if new_best or previous is None:
            _link_or_copy(last, os.path.join(unit, "best.weights.h5"))
        else:
            _link_or_copy(os.path.join(previous, "best.weights.h5"),
                          os.path.join(unit, "best.weights.h5"))
        write_json(os.path.join(unit, "state.json"), state)
        _fsync(unit)
        name, k = f"epoch-{state['epoch']:04d}", 1
        while os.path.lexists(os.path.join(self.units_dir, name)):
            name, k = f"epoch-{state['epoch']:04d}-{k}", k + 1
        os.rename(unit, os.path.join(self.units_dir, name))
        _fsync(self.units_dir)
        link = self.ckpt_dir + ".tmp"
        _remove(link)
        os.symlink(os.path.join(UNITS, name), link)
        os.replace(link, self.ckpt_dir)  # the commit: one atomic rename
        _fsync(self.directory)
        self.state = state
        self.tidy()
        write_metrics(self.directory, self.history)
