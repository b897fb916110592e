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
    "off", "float16" or "bfloat16" (`again_tf.precision`).
    """

    defense: str = "again_pgd"
    dataset: str = "fashion_mnist"
    data_dir: str = None
    model: str = "auto"
    width: int = 0
    epochs: int = 4
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
    eval_steps: int = 10
    val_size: int = 1000
    train_size: int = 0
    test_images: int = 1000
    test_attacks: tuple = ("clean", "pgd20")
    defense_params: dict = dataclasses.field(default_factory=dict)
    memorization_scores: str = None
    seed: int = 0
    out_dir: str = "runs/default"
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
    for flag in ("epochs", "batch_size", "attack_steps"):
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag}={getattr(cfg, flag)} must be at least 1")
    if cfg.lr <= 0:
        raise ValueError(f"--lr={cfg.lr} must be > 0")
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
    objective, _ = registry.get(cfg.defense, **params)
    if uses_index:
        info = data.info(cfg.dataset)
        needed = (cfg.train_size or info.train_size) - cfg.val_size
        if getattr(objective, "num_examples", needed) < needed:
            raise ValueError(f"--memorization_scores={params['memorization_scores']} holds "
                             f"{objective.num_examples} scores; the training examples are "
                             f"train[:{needed}], so expected at least {needed}")


def defense_hparams(cfg):
    """The defense's hyper-parameters: --defense_params plus --memorization_scores."""
    params = dict(cfg.defense_params)
    if cfg.memorization_scores:
        params["memorization_scores"] = cfg.memorization_scores
    return params


def resolve(cfg):
    """Fills in the dataset-dependent defaults ("auto" model, ε, step)."""
    info = data.info(cfg.dataset)
    cfg = dataclasses.replace(cfg)
    if cfg.model == "auto":
        cfg.model = "small_cnn" if info.shape[0] == 28 else "preact_resnet18"
    if cfg.width and cfg.model != "small_cnn":
        raise ValueError(f"--width={cfg.width} applies to --model=small_cnn only "
                         f"(received --model={cfg.model})")
    if cfg.model == "small_cnn":
        cfg.width = cfg.width or 16  # half the classic 32: PGD-AT fits in minutes on a CPU
    cfg.eps = cfg.eps or info.eps
    cfg.step_size = cfg.step_size or (cfg.eps / 4)
    cfg.lr_milestones = tuple(int(m) for m in cfg.lr_milestones)
    cfg.test_attacks = tuple(cfg.test_attacks)
    return cfg, info


def use_xla(setting):
    """`auto` compiles with XLA only on a GPU: on CPU, XLA made PGD-AT ~6x slower here."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    return bool(tf.config.list_physical_devices("GPU"))


def prepare_out_dir(cfg):
    """Creates the run folder; refuses one that holds another run unless resuming it."""
    run_file = os.path.join(cfg.out_dir, "run.json")
    previous = checkpoint.read_json(run_file)
    if previous is None:
        if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
            raise RunError(f"--out_dir={cfg.out_dir} is not empty and holds no again_tf run; "
                           f"choose a new or empty folder")
        os.makedirs(cfg.out_dir, exist_ok=True)
        checkpoint.write_json(run_file, _as_json(cfg))
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
    checkpoint.write_json(run_file, mine)
    return True


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


def datasets(cfg, info):
    """(train, validation or None) batched pipelines; validation is held out of train."""
    size = cfg.train_size or info.train_size
    if cfg.val_size >= size:
        raise ValueError(f"--val_size={cfg.val_size} leaves no training data "
                         f"(--train_size={size})")
    # Defenses with per-example state (BAT's memorization scores) get (x, y, index).
    train_ds, _ = data.load(cfg.dataset, f"train[:{size - cfg.val_size}]", cfg.data_dir,
                            with_index=registry.needs(cfg.defense, "uses_index"))
    train = data.pipeline(train_ds, cfg.batch_size, training=True, augment=info.augment,
                          seed=cfg.seed)
    val = None
    if cfg.val_size:
        val_ds, _ = data.load(cfg.dataset, f"train[{size - cfg.val_size}:{size}]", cfg.data_dir)
        val = data.pipeline(val_ds, 256)
    return train, val, size - cfg.val_size


def build(cfg, info):
    """The classifier wrapped in an `AdversarialModel`, compiled."""
    kwargs = {"width": cfg.width} if cfg.model == "small_cnn" else {}
    net = models.build(cfg.model, info.num_classes, mean=info.mean, std=info.std, **kwargs)
    adv = AdversarialModel(net, defense=cfg.defense, eps=cfg.eps, step_size=cfg.step_size,
                           steps=cfg.attack_steps, norm=cfg.norm,
                           eval_steps=cfg.eval_steps if cfg.val_size else 0,
                           weight_decay=cfg.weight_decay, seed=cfg.seed,
                           **defense_hparams(cfg))
    adv.build((None,) + tuple(info.shape))
    return adv


def train(cfg):
    """Runs (or resumes) a training run; returns the final results dict.

    Raises ValueError/RunError for bad input before anything is written, and
    FloatingPointError when the loss becomes NaN (the last good checkpoint is kept).
    """
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
    resuming = prepare_out_dir(cfg)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    if cfg.verbose and strategy.num_replicas_in_sync > 1:
        print(f"Training on {distribute.describe(strategy)}, global batch {cfg.batch_size}")
    with precision.policy(cfg.mixed_precision), strategy.scope():
        models.set_sync_batchnorm(cfg.sync_batchnorm)
        try:
            adv = build(cfg, info)
        finally:
            models.set_sync_batchnorm(False)
        adv.compile(optimizer=build_optimizer(cfg, steps_per_epoch),
                    jit_compile=use_xla(cfg.jit_compile))
        saver = checkpoint.Checkpointer(cfg.out_dir)
        initial_epoch = 0
        if resuming and os.path.exists(saver.last):
            adv.optimizer.build(adv.trainable_variables)
            adv.load_weights(saver.last)
            initial_epoch = saver.state["epoch"]
            if cfg.verbose:
                print(f"Resuming {cfg.out_dir} after epoch {initial_epoch}")
    callbacks = [saver, keras.callbacks.CSVLogger(os.path.join(cfg.out_dir, "metrics.csv"),
                                                  append=resuming)]
    start = time.time()
    if initial_epoch < cfg.epochs:
        try:
            adv.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs,
                    initial_epoch=initial_epoch, callbacks=callbacks, verbose=cfg.verbose)
        except KeyboardInterrupt:
            saver.save_interrupted()
            print(f"\nInterrupted: state saved in {cfg.out_dir}; rerun with --resume to continue.")
            raise
    if saver.nan_epoch is not None:
        good = saver.state["epoch"]
        raise FloatingPointError(
            f"The loss became NaN in epoch {saver.nan_epoch}; training stopped and the last "
            f"good checkpoint (epoch {good}) is kept in {saver.ckpt_dir}. Lower --lr or "
            f"check the data.")
    return finish(cfg, info, adv, saver, time.time() - start)


def finish(cfg, info, adv, saver, seconds):
    """Exports the models and evaluates the final one on held-out test images."""
    net = adv.model
    checkpoint.save_model(net, os.path.join(cfg.out_dir, "model.keras"))
    export(net, os.path.join(cfg.out_dir, "saved_model"), info.shape)
    final_weights = [w.numpy() for w in adv.weights]
    adv.load_weights(saver.best)
    checkpoint.save_model(net, os.path.join(cfg.out_dir, "best.keras"))
    adv.set_weights(final_weights)

    x, y = data.load_arrays(cfg.dataset, f"test[:{cfg.test_images}]", cfg.data_dir)
    x = x.astype(np.float32) / 255.0
    scores = evaluation.evaluate(net, x, y, cfg.test_attacks, eps=cfg.eps,
                                 step_size=cfg.step_size, norm=cfg.norm, seed=cfg.seed)
    result = {"defense": cfg.defense, "dataset": cfg.dataset, "model": cfg.model,
              "eps": cfg.eps, "test_images": len(y), "epochs": saver.state["epoch"],
              "train_seconds": round(seconds, 1),
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
