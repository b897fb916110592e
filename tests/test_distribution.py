"""Distribution: every defense takes the same steps on 2 replicas (mirrored on two logical
CPUs, or two worker processes on 127.0.0.1) as on one device; synchronized BatchNorm;
train.py --strategy=mirrored; bad strategy settings."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from again_tf import distribute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs jobs [kind, [defense, ...], out] given as JSON in argv[1], in one process: per job,
# trains one tiny model per defense for 2 epochs of one global batch of 16 on the strategy
# named by `kind`, and saves {defense: [weights...]} to `out`. The CPU is split into two
# logical devices once, so one-device and mirrored jobs share a process (one TensorFlow
# start-up for all). The attack's start is a fixed function of x (random starts are drawn
# per replica, so they cannot match one device's): x + 0.02·cos(50x), inside the ε = 0.1 ball.
SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np, tensorflow as tf
    from again_tf import distribute, models
    jobs = json.loads(sys.argv[1])
    if jobs[0][0] != "multi_worker":
        distribute.configure_cpu_replicas(2)
    import keras
    from again_tf.defenses import AdversarialModel

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 16)

    def value(v):
        for kind_of in (int, float):
            try:
                return kind_of(v)
            except ValueError:
                pass
        return v

    strategies = {}

    def strategy_for(kind):
        # One strategy of each type per process: two MirroredStrategy objects over the same
        # devices number their collective instances alike, so the second one's all-reduces
        # meet the first one's (TensorFlow fails with a shape mismatch between replicas).
        kind = kind.split("_")[0]
        if kind not in strategies:
            strategies[kind] = (distribute.make_strategy(kind, cpu_replicas=2)
                                if kind == "mirrored" else
                                distribute.make_strategy("multi_worker") if kind == "multi"
                                else tf.distribute.OneDeviceStrategy("/cpu:0"))
        return strategies[kind]

    def net(kind):
        if "bn" in kind:  # a Classifier with BatchNorm (small_cnn's blocks)
            return models.SmallCNN(3, width=2, hidden=8, sync_batchnorm="sync" in kind)
        return keras.Sequential([keras.Input((8, 8, 1)),
                                 keras.layers.Conv2D(4, 3, activation="relu"),
                                 keras.layers.Flatten(), keras.layers.Dense(3)])

    for kind, defenses, out in jobs:
        strategy = strategy_for(kind)
        results = {}
        for name in defenses:
            defense, _, params = name.partition(":")
            hparams = {k: value(v) for k, v in (p.split("=") for p in params.split(";") if p)}
            arrays = (x, y)
            if defense == "bat":  # atypical examples all in the first replica's half:
                # replicas' local sums of the weights would differ from the global one
                hparams["memorization_scores"] = np.where(np.arange(16) < 8, 0.9, 0.0)
                arrays = (x, y, np.arange(16))
            with strategy.scope():
                keras.utils.set_random_seed(0)
                classifier = net(kind)
                adv = AdversarialModel(classifier, defense=defense, eps=0.1, step_size=0.03,
                                       steps=3, weight_decay=0.01, eval_steps=0, **hparams)
                adv.build((None, 8, 8, 1))
                adv.attack.start = lambda z: tf.clip_by_value(z + 0.02 * tf.cos(50.0 * z), 0, 1)
                if defense == "las_at":  # its random draws, as fixed functions of the inputs
                    adv.attack.policy_start = adv.attack.start
                    adv.objective.sample = lambda heads: [
                        tf.argmax(h, -1, output_type=tf.int32) for h in heads]
                    adv.objective.reward_start = lambda z, eps: tf.clip_by_value(
                        z + 0.5 * eps * tf.cos(30.0 * z), 0, 1)
                # The one-device reference steps run eagerly: an independent computation of
                # what the compiled replicated steps must give (and no trace to pay for).
                adv.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
                            run_eagerly=kind.startswith("one_device"))
            data = tf.data.Dataset.from_tensor_slices(arrays).batch(16)
            if kind == "multi_worker":
                data = distribute.shard_by_data(data)
            adv.fit(data, epochs=2, verbose=0)
            strategy_net = getattr(adv.objective, "strategy", None)  # LAS-AT's policy network
            extra = strategy_net.weights if isinstance(strategy_net, keras.layers.Layer) else []
            results[name] = [v.numpy() for v in classifier.weights + extra]
        np.savez(out, **{f"{k}|{i}": w for k, ws in results.items() for i, w in enumerate(ws)})
        print(kind, "replicas", strategy.num_replicas_in_sync)
""")


def run_script(jobs, env=None):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(jobs)],
                            cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def differences(a, b, names=None):
    """{defense: max |weight difference|} between two saved runs (all their defenses, or
    `names`)."""
    a, b = np.load(a), np.load(b)

    def keys(saved):
        return sorted(k for k in saved.files if names is None or k.split("|")[0] in names)

    assert keys(a) == keys(b)
    out = {}
    for key in keys(a):
        name = key.split("|")[0]
        out[name] = max(out.get(name, 0.0), float(np.abs(a[key] - b[key]).max()))
    return out


# PGD-AT, TRADES, MART and AWP at least; AWP's warm-up switch (trades_awp with awp_warmup=1:
# no perturbation in epoch 0, a perturbation in epoch 1); FAT's early stop (without its
# per-step noise ω, random); LBGAT's jointly trained teacher.
DEFENSES = ["pgd_at", "trades", "mart", "awp", "trades_awp:awp_warmup=1", "fat:omega=0",
            "lbgat"]
# BAT's reweighting, normalized by the global sum of the weights.
BAT = "bat:beta=0.0;alpha=2.0"
# LAS-AT's REINFORCE step, its strategy network updated every step.
LAS = ("las_at:interval=1;strategy=small_cnn;policy_lr=1.0;reward_steps=2;"
       "reward_restarts=1;steps_range=1:3")


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """The one-device and two-replica runs of this file's tests, made in one process:
    {kind: saved weights}."""
    folder = tmp_path_factory.mktemp("distribution")
    jobs = [("one_device", DEFENSES + [BAT], "one.npz"),
            ("mirrored", DEFENSES + [BAT], "two.npz"),
            ("one_device_bn", ["pgd_at", LAS], "one_bn.npz"),
            ("mirrored_bn_sync", ["pgd_at", LAS], "two_bn_sync.npz"),
            ("mirrored_bn", ["pgd_at"], "two_bn.npz")]
    jobs = [(kind, names, str(folder / out)) for kind, names, out in jobs]
    printed = finish(run_script(jobs)).splitlines()
    assert printed == [f"{kind} replicas {1 if kind.startswith('one') else 2}"
                       for kind, _, _ in jobs]
    return {kind: out for kind, _, out in jobs}


def test_mirrored_defenses_match_one_device(local_runs):
    """Two replicas of 8 examples take the same 2 steps as one device with 16 (all defenses)."""
    diff = differences(local_runs["one_device"], local_runs["mirrored"], DEFENSES)
    assert set(diff) == set(DEFENSES)
    assert all(d < 2e-5 for d in diff.values()), diff
    assert diff["pgd_at"] < 1e-5, diff


def test_bat_on_mirrored_replicas_normalizes_by_the_global_weight_sum(local_runs):
    diff = differences(local_runs["one_device"], local_runs["mirrored"], [BAT])
    assert set(diff) == {BAT} and diff[BAT] < 1e-5, diff


def test_sync_batchnorm_matches_one_device_and_plain_batchnorm_does_not(local_runs):
    """With BatchNorm, replicas match one device only when the statistics are synchronized."""
    one = local_runs["one_device_bn"]
    synced = differences(one, local_runs["mirrored_bn_sync"], ["pgd_at"])["pgd_at"]
    per_replica = differences(one, local_runs["mirrored_bn"], ["pgd_at"])["pgd_at"]
    assert synced < 2e-5, synced
    assert per_replica > 1e-3, per_replica  # per-replica statistics really differ


def test_las_at_on_mirrored_replicas_matches_one_device(local_runs):
    """LAS-AT's REINFORCE step uses the global batch's reward and gradient on every replica:
    target and strategy networks match one device (synchronized BatchNorm in both)."""
    diff = differences(local_runs["one_device_bn"], local_runs["mirrored_bn_sync"], [LAS])
    assert diff[LAS] < 2e-5, diff


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_match_one_device(local_runs, tmp_path):
    """MultiWorkerMirroredStrategy over two processes on 127.0.0.1 == one device."""
    defenses = ["pgd_at", "awp"]
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        job = ("multi_worker", defenses, str(tmp_path / f"worker{index}.npz"))
        procs.append(run_script([job], env={"TF_CONFIG": json.dumps(config)}))
    try:
        outs = [finish(p, timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [o.split() for o in outs] == [["multi_worker", "replicas", "2"]] * 2
    for index in range(2):  # one device: the same run of the mirrored test
        diff = differences(local_runs["one_device"], tmp_path / f"worker{index}.npz", defenses)
        assert set(diff) == set(defenses)
        assert all(d < 2e-5 for d in diff.values()), (index, diff)


def test_train_py_mirrored_on_two_cpu_replicas(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--strategy=mirrored", "--cpu_replicas=2",
         "--sync_batchnorm", "--train_size=320", "--val_size=64", "--epochs=1",
         "--attack_steps=2", "--eval_steps=2", "--test_images=64", "--batch_size=64",
         "--model=small_cnn", "--width=4", f"--out_dir={out}", "--verbose=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MirroredStrategy with 2 replica(s), global batch 64" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["test_images"] == 64 and 0.0 <= results["pgd20"] <= results["clean"]
    run = json.loads((out / "run.json").read_text())
    assert run["strategy"] == "mirrored" and run["cpu_replicas"] == 2 and run["sync_batchnorm"]


def test_bad_strategy_settings_name_the_flag(monkeypatch):
    with pytest.raises(ValueError, match="--strategy='bogus' is unknown"):
        distribute.make_strategy("bogus")
    with pytest.raises(ValueError, match="--cpu_replicas=2 applies to --strategy=mirrored"):
        distribute.make_strategy("none", cpu_replicas=2)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG=.* is not JSON"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ValueError, match="task.index=3 is outside the 1 workers"):
        distribute.make_strategy("multi_worker")


def test_chief_is_worker_zero_unless_a_chief_is_named(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.is_chief()
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for index, chief in ((0, True), (1, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        assert distribute.is_chief() == chief
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {**cluster, "chief": ["127.0.0.1:3"]},
         "task": {"type": "worker", "index": 0}}))
    assert not distribute.is_chief()
