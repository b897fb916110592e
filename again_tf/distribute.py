"""Distribution strategies for training, and the replica arithmetic the defenses share.

    strategy = again_tf.distribute.make_strategy("mirrored")            # all local GPUs
    strategy = again_tf.distribute.make_strategy("mirrored", cpu_replicas=2)  # CPU test
    strategy = again_tf.distribute.make_strategy("multi_worker")        # reads TF_CONFIG
    with strategy.scope():
        adv = AdversarialModel(...); adv.compile(...)
    adv.fit(dataset_batched_by_the_global_batch_size)

Keras splits each global batch into one slice per replica, runs `train_step` on every
replica and SUMS the replicas' gradients. A defense's loss is a mean over the replica's
slice, so each replica divides its mean by the replica count (`scale_for_replicas`):
the summed gradient is then the gradient of the mean over the global batch, exactly as
on one device. A quantity a defense computes from the whole batch before the optimizer
step (AWP's weight perturbation) is summed over replicas with `sum_over_replicas`, so
every replica applies the same perturbation.

BatchNorm normalizes with the statistics of the replica's own slice unless the model
is built with synchronized BatchNorm (`models.build(..., sync_batchnorm=True)`, a
`Classifier` argument kept in its config; flag `--sync_batchnorm`), which all-reduces the
batch statistics over the replicas: then the forward pass in training mode is the same as
one device's on the global batch.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("none", "mirrored", "multi_worker")


def num_replicas():
    """The number of replicas in sync of the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_for_replicas(loss):
    """`loss / replicas`: a replica's share of the global mean (Keras sums replica gradients).

    Example:
        scaled = scale_for_replicas(tf.reduce_mean(per_example_loss))
    """
    replicas = num_replicas()
    return loss / replicas if replicas > 1 else loss


def sum_over_replicas(values):
    """Sums each tensor of `values` over the replicas (identity without replicas).

    For use inside a replica function such as `train_step`; `None` entries are kept.

    Example:
        grads = sum_over_replicas(tape.gradient(scale_for_replicas(loss), variables))
    """
    values = list(values)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return values
    present = [i for i, v in enumerate(values) if v is not None]
    reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [values[i] for i in present])
    for i, r in zip(present, reduced):
        values[i] = r
    return values


def mean_over_replicas(value):
    """The mean of a replica's scalar (itself a mean over its slice) over the replicas.

    With equal slices (Keras splits the global batch evenly) this is the mean over the
    global batch, the same on every replica (identity without replicas).
    """
    return sum_over_replicas([scale_for_replicas(value)])[0]


def configure_cpu_replicas(count):
    """Splits the first CPU into `count` logical devices; returns their names.

    Must run before TensorFlow initializes its devices (before any tensor is made).
    Only for testing distribution code on a machine without accelerators: the logical
    devices share the same cores, so this is not faster than one device.
    """
    if int(count) < 2:
        raise ValueError(f"--cpu_replicas={count}: expected at least 2 (0 disables it)")
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * int(count)
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        current = tf.config.list_logical_devices("CPU")
        if len(current) != int(count):
            raise ValueError(
                f"--cpu_replicas={count}: TensorFlow's devices were initialized already with "
                f"{len(current)} CPU device(s); create the strategy before any TensorFlow "
                f"op runs") from None
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def tf_config():
    """The parsed TF_CONFIG environment variable, checked; raises ValueError if unusable."""
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable, "
                         'e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        task = config["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"TF_CONFIG={text!r} is not JSON with cluster.worker (a list of "
                         f"host:port) and task.type/task.index") from None
    if kind == "worker" and not 0 <= index < len(workers):
        raise ValueError(f"TF_CONFIG task.index={index} is outside the {len(workers)} workers "
                         f"of cluster.worker")
    return config


def is_chief():
    """True unless this process is a non-chief worker of a TF_CONFIG cluster.

    The chief is the task of type "chief", or worker 0 when the cluster has no chief.
    Only the chief should write a run's files.
    """
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        return True
    config = tf_config()
    task = config["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and int(task["index"]) == 0 and \
        "chief" not in config["cluster"]


def make_strategy(name="none", cpu_replicas=0):
    """Creates the `tf.distribute` strategy called `name`.

    Args:
        name: "none" (TensorFlow's default strategy: one device), "mirrored"
            (`MirroredStrategy` over all local GPUs, or over `cpu_replicas` logical CPU
            devices, or the one CPU) or "multi_worker" (`MultiWorkerMirroredStrategy`, one
            process per machine, the cluster from TF_CONFIG; each worker uses its local
            GPUs, or its CPU). Default "none".
        cpu_replicas: with no GPU, split the CPU into this many logical devices (≥ 2) so
            that "mirrored" runs that many replicas: for testing distribution on a CPU.
            Default 0 (off). Must be set before any TensorFlow op runs.

    Returns:
        The strategy; build and compile the model inside `strategy.scope()` and batch the
        data by the global batch size.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy={name!r} is unknown. Expected one of: "
                         f"{', '.join(STRATEGIES)}")
    if int(cpu_replicas) < 0:
        raise ValueError(f"--cpu_replicas={cpu_replicas}: expected 0 (off) or at least 2")
    gpus = tf.config.list_physical_devices("GPU")
    if name == "multi_worker":
        tf_config()
        if cpu_replicas:
            raise ValueError(f"--cpu_replicas={cpu_replicas} applies to --strategy=mirrored "
                             f"only (a worker of multi_worker runs one CPU replica)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cpu_replicas and name != "mirrored":
        raise ValueError(f"--cpu_replicas={cpu_replicas} applies to --strategy=mirrored only "
                         f"(received --strategy={name})")
    if name == "none":
        return tf.distribute.get_strategy()
    if gpus or not cpu_replicas:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MirroredStrategy(configure_cpu_replicas(cpu_replicas))


def describe(strategy):
    """One line: the strategy's class and its replica count."""
    return f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)"


def shard_by_data(dataset):
    """`dataset` (or None) with auto-sharding by data: each worker of a multi-worker run
    reads the whole pipeline and keeps its part of every global batch (in-memory data has
    no files to shard by)."""
    if dataset is None:
        return None
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def in_multi_worker_mode(strategy=None):
    """True when `strategy` (default: the current one) spans several worker processes."""
    strategy = strategy or tf.distribute.get_strategy()
    extended = getattr(strategy, "extended", None)
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        getattr(extended, "_in_multi_worker_mode", lambda: False)())


def step_logs(metrics):
    """`{name: result}` of `metrics`, as a `train_step`/`test_step` returns them.

    Across workers, Keras 3 reduces every value a step returns with a mean over axis 0,
    which fails on a scalar: there each result is returned as a vector of one element.
    """
    logs = {m.name: m.result() for m in metrics}
    if in_multi_worker_mode():
        logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs
