"""A whole training run, as `python train.py` does it, callable from Python.

    result = again_tf.training.train(TrainConfig(defense="pgd_at", epochs=4, out_dir="runs/a"))

A run's folder holds `run.json` (its configuration), the checkpoints of
`again_tf.checkpoint`, `metrics.csv`/`metrics.json` (one row per epoch), and at the end
`model.keras` (final classifier), `best.keras` (best validation robust accuracy),
`saved_model/` (the final inference path, float32 [0,1] images -> logits) and
`results.json` (the final table).
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from again_tf import checkpoint, data, distribute, evaluation, models, precision
from again_tf.defenses import AdversarialModel, registry

OPTIMIZERS = ("sgd", "adam")
WIDTH_MODELS = ("small_cnn", "resnet18", "preact_resnet18")  # models with a `width` argument
AUTO_WIDTH_28 = 8  # --model=auto on 28x28 gray images: PreAct ResNet-18 at width 8
DEFAULT_TRAIN_SIZE_28, DEFAULT_VAL_SIZE_28 = 10000, 500  # train_size/val_size None, 28x28
SCHEDULES = ("constant", "piecewise", "cosine")
# What must match for --resume to continue a run (the rest, e.g. epochs, may change).
_IDENTITY = ("defense", "dataset", "model", "width", "eps", "norm", "seed", "train_size",
             "val_size", "defense_params", "memorization_scores")


class RunError(Exception):
    """A run cannot start or continue; the message says why in one line."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on; `train.py`'s flags map one to one.

    `eps`/`step_size` None take the dataset's usual values (`data.info`); `model`
    "auto" is `small_cnn` for 28×28 datasets and `preact_resnet18` otherwise; `width`
    0 is 16 for `small_cnn` (the CPU-friendly default; 32 is the classic width).
    `strategy` ("none", "mirrored", "multi_worker"; `cpu_replicas` logical CPU devices
    for testing "mirrored" without GPUs) is made before any TensorFlow op runs;
    `batch_size` is then the global batch, split over the replicas. `sync_batchnorm`
    all-reduces BatchNorm's batch statistics over the replicas; `mixed_precision` is
    "off", "float16" or "bfloat16" (`again_tf.precision`). `attack_training` is
    `AdversarialModel`'s BatchNorm mode of the training attack (True in the recipes of the
    AWP repository's AT_AWP/train_cifar10.py, which attacks in train mode), and
    `attack_updates_statistics` lets that attack move the running statistics as the
    official one does (the same recipes).
    """

    defense: str = "again_pgd"
    dataset: str = "fashion_mnist"
    data_dir: str = None
    model: str = "auto"
    width: int = 0
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_milestones: tuple = ()
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    eps: float = None
    step_size: float = None
    norm: str = "linf"
    attack_steps: int = 10
    attack_training: bool = False
    attack_updates_statistics: bool = False
    eval_steps: int = 10
    val_size: int = None
    train_size: int = None
    test_images: int = 1000
    test_attacks: tuple = ("clean", "pgd20")
    defense_params: dict = dataclasses.field(default_factory=dict)
    memorization_scores: str = None
    seed: int = 0
    out_dir: str = None
    jit_compile: str = "auto"
    strategy: str = "none"
    cpu_replicas: int = 0
    sync_batchnorm: bool = False
    mixed_precision: str = "off"
    resume: bool = False
    verbose: int = 1


def validate(cfg):
    """Raises ValueError (one line, naming the option) for a bad configuration."""
    if cfg.defense not in registry.names():
        raise ValueError(f"--defense={cfg.defense!r} is unknown. Expected one of: "
                         f"{', '.join(registry.names())}")
    data.info(cfg.dataset)
    cfg = default_sizes(cfg)
    if cfg.model != "auto" and cfg.model not in models.MODELS:
        raise ValueError(f"--model={cfg.model!r} is unknown. Expected auto or one of: "
                         f"{', '.join(models.MODELS)}")
    for flag in ("eps", "step_size"):
        value = getattr(cfg, flag)
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"--{flag}={value} is outside (0, 1]: it is in [0, 1] pixel "
                             f"units (for 8/255 pass --{flag}=8/255)")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer={cfg.optimizer!r} is unknown. Expected one of: "
                         f"{', '.join(OPTIMIZERS)}")
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr_schedule={cfg.lr_schedule!r} is unknown. Expected one of: "
                         f"{', '.join(SCHEDULES)}")
    for flag in ("epochs", "batch_size", "attack_steps", "test_images"):
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag}={getattr(cfg, flag)} must be at least 1")
    for flag, meaning in (("eval_steps", "0 turns the validation attack off"),
                          ("val_size", "0 holds out nothing"),
                          ("train_size", "0 uses the whole training split"),
                          ("cpu_replicas", "0 is off")):
        if getattr(cfg, flag) < 0:
            raise ValueError(f"--{flag}={getattr(cfg, flag)} must be >= 0 ({meaning})")
    if cfg.train_size > data.info(cfg.dataset).train_size:
        raise ValueError(f"--train_size={cfg.train_size} is more than the "
                         f"{data.info(cfg.dataset).train_size} training examples of "
                         f"{cfg.dataset}")
    for flag in ("lr", "lr_decay"):
        if not getattr(cfg, flag) > 0:
            raise ValueError(f"--{flag}={getattr(cfg, flag)} must be > 0")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"--momentum={cfg.momentum} must be in [0, 1)")
    if not cfg.weight_decay >= 0:
        raise ValueError(f"--weight_decay={cfg.weight_decay} must be >= 0")
    milestones = list(cfg.lr_milestones)
    if any(not isinstance(m, int) or m < 1 for m in milestones) or milestones != sorted(
            set(milestones)):
        raise ValueError(f"--lr_milestones={','.join(map(str, milestones))}: expected "
                         f"increasing epochs >= 1, e.g. 100,150")
    if cfg.lr_schedule == "piecewise" and not milestones:
        raise ValueError("--lr_schedule=piecewise needs --lr_milestones, e.g. 100,150")
    if cfg.attack_updates_statistics and not cfg.attack_training:
        raise ValueError("--attack_updates_statistics needs --attack_training (an "
                         "inference-mode attack writes no statistics)")
    if cfg.jit_compile not in ("auto", "true", "false", True, False):
        raise ValueError(f"--jit_compile={cfg.jit_compile!r}: expected auto, true or false")
    precision.check(cfg.mixed_precision)
    for name in cfg.test_attacks:
        evaluation.parse_attack(name, None, 0.1)
    params = defense_hparams(cfg)
    uses_index = registry.needs(cfg.defense, "uses_index")
    if cfg.memorization_scores and not uses_index:
        raise ValueError(f"--memorization_scores applies to defenses that use memorization "
                         f"scores (bat); received --defense={cfg.defense}")
    if uses_index and params.get("memorization_scores") is None:
        raise ValueError(f"--defense={cfg.defense} needs --memorization_scores=<.npy or .npz "
                         f"file of per-example scores of the training split> (see "
                         f"again_tf.analysis.memorization and benchmarks/memorization.py)")
    if registry.needs(cfg.defense, "needs_holdout") and cfg.val_size < 1:
        raise ValueError(f"--val_size={cfg.val_size}: --defense={cfg.defense} measures "
                         f"class-wise robustness on held-out data; expected --val_size > 0")
    try:
        objective, _ = registry.get(cfg.defense, **params)
    except (TypeError, ValueError) as e:  # e.g. beta=abc: name the flag, not a float()
        text = str(e)
        raise ValueError(text if text.startswith("--") else
                         f"--defense_params={_params_text(cfg.defense_params)} for "
                         f"--defense={cfg.defense}: {text}") from None
    if uses_index:
        info = data.info(cfg.dataset)
        needed = (cfg.train_size or info.train_size) - cfg.val_size
        if getattr(objective, "num_examples", needed) < needed:
            raise ValueError(f"--memorization_scores={params['memorization_scores']} holds "
                             f"{objective.num_examples} scores; the training examples are "
                             f"train[:{needed}], so expected at least {needed}")


def _params_text(params):
    return ",".join(f"{k}={v}" for k, v in dict(params).items())


def defense_hparams(cfg):
    """The defense's hyper-parameters: --defense_params plus --memorization_scores."""
    params = dict(cfg.defense_params)
    if cfg.memorization_scores:
        params["memorization_scores"] = cfg.memorization_scores
    return params


def small_images(info):
    """MNIST-like data (28x28 gray), where the CPU defaults apply."""
    return info.shape[0] <= 32 and info.shape[-1] == 1


def default_sizes(cfg):
    """`cfg` with `train_size`/`val_size` None replaced by their defaults.

    The CPU default run on 28x28 data trains on 9,500 images and validates on 500, so
    that `python train.py` finishes in about 10 minutes on 2 cores; other data use the
    whole training split and hold out 1,000.
    """
    small = small_images(data.info(cfg.dataset))
    return dataclasses.replace(
        cfg, train_size=(DEFAULT_TRAIN_SIZE_28 if small else 0) if cfg.train_size is None
        else cfg.train_size,
        val_size=(DEFAULT_VAL_SIZE_28 if small else 1000) if cfg.val_size is None
        else cfg.val_size)


def resolve(cfg):
    """Fills in the dataset-dependent defaults ("auto" model, ε, step)."""
    info = data.info(cfg.dataset)
    cfg = dataclasses.replace(cfg)
    if cfg.model == "auto":
        cfg.model = "preact_resnet18"
        # The papers' ResNet-18 shape at 1/8 of its width: PGD-AT fits in minutes on a CPU.
        cfg.width = cfg.width or (AUTO_WIDTH_28 if small_images(info) else 0)
    if cfg.width and cfg.model not in WIDTH_MODELS:
        raise ValueError(f"--width={cfg.width} applies to --model="
                         f"{'/'.join(WIDTH_MODELS)} only (received --model={cfg.model})")
    if cfg.model == "small_cnn":
        cfg.width = cfg.width or 16  # half the classic 32: PGD-AT fits in minutes on a CPU
    elif cfg.model in WIDTH_MODELS:
        cfg.width = cfg.width or 64  # the papers' ResNet-18
    cfg = default_sizes(cfg)
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join("runs", f"{cfg.dataset}_{cfg.model}_{cfg.defense}")
    cfg.eps = cfg.eps or info.eps
    cfg.step_size = cfg.step_size or (cfg.eps / 4)
    cfg.lr_milestones = tuple(int(m) for m in cfg.lr_milestones)
    cfg.test_attacks = tuple(cfg.test_attacks)
    return cfg, info


def width_kwargs(cfg):
    """The model constructor's `width` argument, for the models that take one."""
    return {"width": cfg.width} if cfg.model in WIDTH_MODELS else {}


def use_xla(setting):
    """`auto` compiles with XLA only on a GPU: on CPU, XLA made PGD-AT ~6x slower here."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    return bool(tf.config.list_physical_devices("GPU"))


def prepare_out_dir(cfg):
    """Creates the run folder and takes its lock; refuses one that holds another run
    unless resuming it, and a resume whose checkpoint cannot continue with `cfg`.

    Everything is checked before anything is written; the lock (`checkpoint.lock`) is
    held until `checkpoint.unlock(cfg.out_dir)`. Returns True when resuming.
    """
    run_file = os.path.join(cfg.out_dir, "run.json")
    previous = checkpoint.read_json(run_file)
    if previous is None:
        if os.path.isdir(cfg.out_dir) and set(os.listdir(cfg.out_dir)) - {".lock"}:
            raise RunError(f"--out_dir={cfg.out_dir} is not empty and holds no again_tf run; "
                           f"choose a new or empty folder")
        _writable(cfg.out_dir, lambda: checkpoint.write_json(run_file, _as_json(cfg)))
        return False
    if not cfg.resume:
        raise RunError(f"--out_dir={cfg.out_dir} holds a run already; pass --resume to "
                       f"continue it or choose another --out_dir (nothing was overwritten)")
    mine = _as_json(cfg)
    differ = [k for k in _IDENTITY if previous.get(k) != mine.get(k)]
    if differ:
        raise RunError(f"--resume: the run in {cfg.out_dir} was made with different "
                       + ", ".join(f"--{k} ({previous.get(k)!r} there, {mine.get(k)!r} now)"
                                   for k in differ))

    def resume_checked():
        state = checkpoint.read_state(cfg.out_dir)
        if state is not None:
            refusal, _ = resume_changes(state, cfg)
            if refusal:
                raise RunError(refusal)
        checkpoint.write_json(run_file, mine)

    _writable(cfg.out_dir, resume_checked)
    return True


def _writable(out_dir, then):
    """Creates `out_dir`, takes its lock and runs `then()`; OSError -> one-line RunError."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.lock(out_dir)
    except OSError as e:
        raise RunError(f"--out_dir={out_dir} cannot be written: {e.strerror or e}") from None
    try:
        then()
    except OSError as e:
        checkpoint.unlock(out_dir)
        raise RunError(f"--out_dir={out_dir} cannot be written: {e.strerror or e}") from None
    except BaseException:
        checkpoint.unlock(out_dir)
        raise


def optimizer_settings(cfg):
    """What the optimizer's state and learning rate depend on; each checkpoint records it."""
    settings = {"optimizer": cfg.optimizer, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
                "batch_size": cfg.batch_size}
    if cfg.optimizer == "sgd":
        settings["momentum"] = cfg.momentum
    if cfg.lr_schedule == "piecewise":
        settings.update(lr_milestones=list(cfg.lr_milestones), lr_decay=cfg.lr_decay)
    if cfg.lr_schedule == "cosine":
        settings["epochs"] = cfg.epochs  # the cosine's length
    return settings


def resume_changes(state, cfg):
    """(refusal or None, [changes applied]) between a checkpoint's `state` and `cfg`.

    A changed optimizer, or a change between a constant learning rate and a schedule,
    cannot carry the optimizer state over (other variables); a schedule counts steps,
    so its batch size may not change. The learning rate, momentum and schedule
    parameters may: they apply from the next epoch on, and the change is reported.
    """
    old, new = state["optimizer"], optimizer_settings(cfg)
    where = f"--resume: the checkpoint in {cfg.out_dir} (epoch {state['epoch']})"
    if state["epoch"] > cfg.epochs:
        return (f"{where} has trained more than --epochs={cfg.epochs}; pass --epochs >= "
                f"{state['epoch']}"), []
    if old.get("optimizer") != new["optimizer"]:
        return (f"{where} holds {old.get('optimizer')} state; --optimizer={new['optimizer']} "
                f"cannot continue it: resume with --optimizer={old.get('optimizer')} or "
                f"start a new run"), []
    if (old.get("lr_schedule") == "constant") != (new["lr_schedule"] == "constant"):
        return (f"{where} was trained with --lr_schedule={old.get('lr_schedule')}, whose "
                f"optimizer state --lr_schedule={new['lr_schedule']} cannot continue "
                f"(a learning-rate variable in one, a schedule in the other): resume with "
                f"--lr_schedule={old.get('lr_schedule')} or start a new run"), []
    if new["optimizer"] == "sgd" and (old.get("momentum") == 0) != (new["momentum"] == 0):
        return (f"{where} was trained with --momentum={old.get('momentum')}; SGD keeps "
                f"momentum buffers only when momentum > 0, so --momentum={new['momentum']} "
                f"cannot continue its state"), []
    if new["lr_schedule"] != "constant" and old.get("batch_size") != new["batch_size"]:
        return (f"{where} was trained with --batch_size={old.get('batch_size')}; the "
                f"{new['lr_schedule']} schedule counts steps, so --batch_size="
                f"{new['batch_size']} would move it: resume with --batch_size="
                f"{old.get('batch_size')}"), []
    changes = [f"--{k}={new.get(k)!r} (was {old.get(k)!r})"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return None, [c.replace("'", "") for c in changes]


def _as_json(cfg):
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def build_optimizer(cfg, steps_per_epoch):
    lr = cfg.lr
    if cfg.lr_schedule == "piecewise":
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            [m * steps_per_epoch for m in cfg.lr_milestones],
            [cfg.lr * cfg.lr_decay ** i for i in range(len(cfg.lr_milestones) + 1)])
    elif cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, cfg.epochs * steps_per_epoch)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum)
    return keras.optimizers.Adam(lr)


def _training_examples(cfg, info):
    """The unbatched training split (validation held out); `(x, y, index)` for the
    defenses with per-example state (BAT's memorization scores)."""
    size = cfg.train_size or info.train_size
    if cfg.val_size >= size:
        raise ValueError(f"--val_size={cfg.val_size} leaves no training data "
                         f"(--train_size={size})")
    train_ds, _ = data.load(cfg.dataset, f"train[:{size - cfg.val_size}]", cfg.data_dir,
                            with_index=registry.needs(cfg.defense, "uses_index"))
    return train_ds


def training_batches(cfg, info, first_epoch=0):
    """The training batches of epochs `first_epoch` to `cfg.epochs - 1`, each epoch's
    order and augmentation fixed by (seed, epoch): a resumed run sees the batches an
    uninterrupted one saw (`data.training_epochs`)."""
    batches = data.training_epochs(_training_examples(cfg, info), cfg.batch_size, cfg.seed,
                                   cfg.epochs, first_epoch, augment=info.augment)
    if cfg.strategy == "multi_worker":  # each worker takes its slice of every global batch
        batches = distribute.shard_by_data(batches)
    return batches


def datasets(cfg, info):
    """(train, validation or None) batched pipelines; validation is held out of train."""
    size = cfg.train_size or info.train_size
    train_ds = _training_examples(cfg, info)
    train = data.pipeline(train_ds, cfg.batch_size, training=True, augment=info.augment,
                          seed=cfg.seed)
    val = None
    if cfg.val_size:
        val_ds, _ = data.load(cfg.dataset, f"train[{size - cfg.val_size}:{size}]", cfg.data_dir)
        val = data.pipeline(val_ds, 256)
    return train, val, size - cfg.val_size


def build(cfg, info):
    """The classifier wrapped in an `AdversarialModel`, compiled."""
    net = models.build(cfg.model, info.num_classes, mean=info.mean, std=info.std,
                       sync_batchnorm=cfg.sync_batchnorm, **width_kwargs(cfg))
    adv = AdversarialModel(net, defense=cfg.defense, eps=cfg.eps, step_size=cfg.step_size,
                           steps=cfg.attack_steps, norm=cfg.norm,
                           attack_training=cfg.attack_training,
                           attack_updates_statistics=cfg.attack_updates_statistics,
                           eval_steps=cfg.eval_steps if cfg.val_size else 0,
                           weight_decay=cfg.weight_decay, seed=cfg.seed,
                           **defense_hparams(cfg))
    adv.build((None,) + tuple(info.shape))
    return adv


def train(cfg, callbacks=()):
    """Runs (or resumes) a training run; returns the final results dict.

    `callbacks`: extra Keras callbacks, run before the checkpoint at each epoch's end, so
    values they add to the epoch's `logs` are saved in the run's metrics (and resumed).

    Raises ValueError/RunError for bad input before anything is written, and
    FloatingPointError when the loss becomes NaN (the last good checkpoint is kept).
    """
    started = time.time()
    strategy = distribute.make_strategy(cfg.strategy, cfg.cpu_replicas)  # before any TF op
    validate(cfg)
    cfg, info = resolve(cfg)
    if not distribute.is_chief():  # another worker of a multi-worker run writes the files
        cfg = dataclasses.replace(cfg, out_dir=tempfile.mkdtemp(prefix="again_tf_worker_"),
                                  verbose=0, resume=False)
    keras.utils.set_random_seed(cfg.seed)
    train_ds, val_ds, n_train = datasets(cfg, info)
    if cfg.strategy == "multi_worker":  # each worker takes its slice of every global batch
        train_ds, val_ds = (distribute.shard_by_data(d) for d in (train_ds, val_ds))
    resuming = prepare_out_dir(cfg)  # takes the folder's lock: released when train ends
    try:
        return _train_locked(cfg, info, strategy, val_ds, n_train, resuming, started,
                             callbacks)
    finally:
        checkpoint.unlock(cfg.out_dir)


class ValidationProgress(keras.callbacks.Callback):
    """A progress bar for each epoch's validation inside `fit`, which Keras runs without
    one: the robust validation attacks every batch and takes a while."""

    def __init__(self, steps, attacked):
        super().__init__()
        self.steps, self.attacked = steps, attacked
        self._bar = None

    def on_test_begin(self, logs=None):
        what = "clean and PGD robust accuracy" if self.attacked else "clean accuracy"
        print(f"\nValidation ({what}):", flush=True)
        self._bar = keras.utils.Progbar(self.steps, unit_name="batch")

    def on_test_batch_end(self, batch, logs=None):
        self._bar.update(batch + 1)


def _train_locked(cfg, info, strategy, val_ds, n_train, resuming, started, callbacks=()):
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    if cfg.verbose and strategy.num_replicas_in_sync > 1:
        print(f"Training on {distribute.describe(strategy)}, global batch {cfg.batch_size}")
    with precision.policy(cfg.mixed_precision), strategy.scope():
        adv = build(cfg, info)
        adv.compile(optimizer=build_optimizer(cfg, steps_per_epoch),
                    jit_compile=use_xla(cfg.jit_compile))
        saver = checkpoint.Checkpointer(cfg.out_dir, settings=optimizer_settings(cfg))
        initial_epoch = saver.restore(adv) if resuming else 0
        if initial_epoch:
            _, changes = resume_changes(saver.state, cfg)
            if cfg.lr_schedule == "constant":  # the checkpoint's lr variable was loaded too
                adv.optimizer.learning_rate = cfg.lr
            if cfg.verbose:
                print(f"Resuming {cfg.out_dir} after epoch {initial_epoch}")
            if changes and initial_epoch < cfg.epochs:
                print(f"--resume: from epoch {initial_epoch + 1} on, training uses the changed "
                      + ", ".join(changes))
        elif resuming and cfg.verbose:
            print(f"Resuming {cfg.out_dir}: no epoch was finished, starting from epoch 1")
    train_ds = training_batches(cfg, info, initial_epoch)
    progress = []
    if cfg.verbose == 1 and val_ds is not None:
        progress = [ValidationProgress(int(val_ds.cardinality()) if val_ds.cardinality() > 0
                                       else None, cfg.eval_steps > 0)]
    start = time.time()
    if initial_epoch < cfg.epochs:
        try:
            adv.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs,
                    initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                    callbacks=[*callbacks, *progress, saver], verbose=cfg.verbose)
        except KeyboardInterrupt:
            saver.save_interrupted()
            print(f"\nInterrupted: the last finished epoch ({saver.state['epoch']}) is kept in "
                  f"{cfg.out_dir}; rerun with --resume to continue.")
            raise
    if saver.nan_epoch is not None:
        good = saver.state["epoch"]
        kept = (f"the last good checkpoint (epoch {good}) is kept in {saver.ckpt_dir}" if good
                else f"no epoch finished, so no checkpoint was written in {cfg.out_dir}")
        raise FloatingPointError(
            f"The loss became NaN in epoch {saver.nan_epoch}; training stopped and {kept}. "
            f"Lower --lr or check the data.")
    trained_images = n_train * max(0, cfg.epochs - initial_epoch)
    return finish(cfg, info, adv, saver, time.time() - start, trained_images, started)


def finish(cfg, info, adv, saver, seconds, trained_images=0, started=None):
    """Exports the models and evaluates the final one on held-out test images.

    `seconds` is the training time of this invocation (over `trained_images` images),
    `started` the `time.time()` at which the run started (for the elapsed time). The
    result's `train_seconds` is the run's, summed over resumes (the checkpoint's).
    """
    net = adv.model
    if cfg.verbose:
        print(f"Saving model.keras, best.keras and saved_model/ to {cfg.out_dir} ...")
    checkpoint.save_model(net, os.path.join(cfg.out_dir, "model.keras"))
    export(net, os.path.join(cfg.out_dir, "saved_model"), info.shape)
    final_weights = [w.numpy() for w in adv.weights]
    adv.load_weights(saver.best)
    checkpoint.save_model(net, os.path.join(cfg.out_dir, "best.keras"))
    adv.set_weights(final_weights)

    x, y = data.load_arrays(cfg.dataset, f"test[:{cfg.test_images}]", cfg.data_dir)
    x = x.astype(np.float32) / 255.0
    if cfg.verbose:
        print(f"Evaluating on the first {len(y)} {cfg.dataset} test images: "
              f"{', '.join(cfg.test_attacks)}")
    eval_start = time.time()
    scores = evaluation.evaluate(net, x, y, cfg.test_attacks, eps=cfg.eps,
                                 step_size=cfg.step_size, norm=cfg.norm, seed=cfg.seed,
                                 verbose=1 if cfg.verbose == 1 else 0)
    eval_seconds = time.time() - eval_start
    result = {"defense": cfg.defense, "dataset": cfg.dataset, "model": cfg.model,
              "width": cfg.width, "eps": cfg.eps, "test_images": len(y),
              "epochs": saver.state["epoch"],
              "train_seconds": round(saver.state.get("train_seconds", seconds), 1),
              "eval_seconds": round(eval_seconds, 1),
              **{name: s["accuracy"] for name, s in scores.items()}}
    by_loss = {name: s["by_loss"] for name, s in scores.items() if "by_loss" in s}
    if by_loss:  # auxiliary heads: each attack's accuracy per objective (adaptive evaluation)
        result["by_loss"] = by_loss
    for m in adv.modifiers:  # the class-wise defense's inference offset, folded into the model
        if getattr(m, "logit_offset", None) is not None:
            result["logit_offset"] = [round(float(v), 6) for v in m.logit_offset.numpy()]
    checkpoint.write_json(os.path.join(cfg.out_dir, "results.json"), result)
    if cfg.verbose:
        print(f"\nTest accuracy on the first {len(y)} {cfg.dataset} test images, "
              f"eps={cfg.eps:.4g} ({cfg.norm}):")
        print(evaluation.format_table([result], ["defense", "model"] + list(cfg.test_attacks)))
        for name, accs in by_loss.items():
            print(f"{name} by attack loss (the table shows the per-image worst case): "
                  + ", ".join(f"{o} {a:.4f}" for o, a in accs.items()))
        print(f"Saved to {cfg.out_dir}: model.keras, best.keras, saved_model/, results.json")
        if trained_images and seconds > 0:
            print(f"Training: {trained_images} training images in {seconds:.0f} s "
                  f"({trained_images / seconds:.1f} images/s, with per-epoch validation)")
        print(f"Evaluation: {len(y)} images x {len(cfg.test_attacks)} attack(s) in "
              f"{eval_seconds:.0f} s")
        if started is not None:
            elapsed = time.time() - started
            print(f"Elapsed: {int(elapsed // 60)} min {elapsed % 60:.0f} s")
    return result


def export(model, path, shape):
    """SavedModel of the inference path: float32 images in [0, 1] -> logits.

    Replaces `path` only once the new export is complete.
    """
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.export(tmp, format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec((None,) + tuple(shape), tf.float32, name="images")])
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
