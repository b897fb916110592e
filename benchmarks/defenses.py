"""Trains every defense with one Fashion-MNIST budget and tabulates its robustness.

    python benchmarks/defenses.py                       # full budget: 5 epochs, 60k images
    python benchmarks/defenses.py --seeds=0,1,2 --seeds_for=none,pgd_at,again_pgd,again_awp,awp,cas
    python benchmarks/defenses.py --model=small_cnn --cw  # the small-CNN table
    python benchmarks/defenses.py --epochs=1 --train_size=512 --test_images=32 --aa_images=32

Each defense is trained by `again_tf.training.train` (what `train.py` runs) with the same
data, model (`--model`, default `auto`: PreAct ResNet-18 at width 8 on Fashion-MNIST),
Adam 1e-3, epochs, ε = 0.1, PGD-`--attack_steps` (step 0.025) and seed; its own
hyper-parameters are the `--defense_params` of its recipe `flags/fashion_mnist_<defense>.cfg`
(or the older name `flags/fashion_mnist_cnn_<defense>.cfg`) when there is one, else its
defaults. Row `again_pgd_hff` is `again_pgd` with `hff=1`: AGAIN's full method (ASE + HFF;
the official code never calls HFF, so `again_pgd` leaves it off).

Columns, on the first `--test_images` test images (robust ones at ε = 0.1, PGD step 0.025,
each run's own seed):
    clean             accuracy.
    PGD-20            adaptive PGD-20 (`evaluation.evaluate(..., loss="adaptive")`): for a
                      model with auxiliary heads an image counts as robust only if it
                      survives PGD-20 on each of the main, combined and auxiliary losses.
    AutoAttack        standard AutoAttack, adaptive (APGD-CE on the combined and auxiliary
                      losses after it), on the first `--aa_images` test images; only the
                      rows of `--aa_defenses`.
    official          PGD-20 on CE(main) + 2·mean CE(aux) (`loss="combined"`), the loss the
                      official AGAIN/CAS/CIFS evaluation scripts attack.
    main head         PGD-20 on CE(main) alone (`loss="main"`).
    mask-choice       PGD-20 differentiated through the masks' argmax choice (straight-
                      through softmax): per image the worst of `loss="main_relaxed"` and
                      `loss="combined_relaxed"`.
    aux clean / aux PGD-20
                      accuracy of the last inserted layer's auxiliary head (the one at the
                      penultimate map) on the clean images and on PGD-20 examples of the
                      auxiliary loss (mean CE over the heads), `analysis.heads.head_report`.
    agree clean / agree PGD-20
                      how often that head's prediction equals the model's, on the same
                      clean and attacked images.
    worst class       the lowest per-class accuracy under the adaptive PGD-20.
    CW-∞              (with `--cw`) adaptive 30-step PGD on the C&W margin.
    train s           training seconds.
"official", "main head" and "mask-choice" show "=" for models without auxiliary heads
(every objective is then the main loss: the PGD-20 column); the auxiliary-head columns
show "—" there; "·" is a measurement not made (AutoAttack outside `--aa_defenses`).
`--seeds=0,1,2` trains each defense once per seed (only the first seed for rows outside
`--seeds_for`, if given); cells show mean ± half the range (max − min)/2 over the seeds.

The row bat trains on memorization scores: run `python benchmarks/memorization.py
--train_size=<the same --train_size>` first (it writes the default `--memorization_scores`).

Runs are kept in `--out_dir` (default `runs/defenses/<model>_w<width>/`), one folder per
defense and seed (`<defense>/seed<k>`): `evaluate.py --model_path=<that folder>` re-attacks
one. A rerun skips the finished runs (results.json, same configuration), resumes the
unfinished ones, and reuses each run's measured row (`defenses_eval.json` in its folder)
when the evaluation settings are unchanged (`--reevaluate` measures again). A defense that
fails is reported and left out of the table, and the script exits non-zero.
Each measured run is also written as a small record, `--records_dir`/<defense>/seed<k>.json
(default `benchmarks/records/defenses/<model>_w<width>/`, kept in git): its train.py
configuration, the evaluation settings and the measurements. The run folders hold the models
and are not kept in git.
`--from_runs` trains nothing: it rebuilds the table from the finished runs, and for a run
whose folder is gone (a fresh clone) from its record, if the record's configuration and
evaluation settings equal this command's. The Markdown
table is printed with each row's reproducing command and each run's train.py command;
`--json` gets the rows.
"""

import dataclasses
import json
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from again_tf.defenses import registry  # noqa: E402
from benchmarks.recipes import (VARIANTS, base_defense, memorization_file,  # noqa: E402
                                recipe_params)
from benchmarks.runs import NOT_CONFIGURATION, config_differences  # noqa: E402
# The headline rows: AutoAttack by default, and the rows the README asks 3 seeds of.
HEADLINE = ("none", "pgd_at", "again_pgd", "again_awp", "awp", "cas", "again_pgd_hff")


def table_names():
    """Every registered defense, each variant right after its base defense."""
    names = []
    for name in registry.names():
        names.append(name)
        names += [v for v, (base, _) in VARIANTS.items() if base == name]
    return tuple(names)


def params_text(params):
    """{"beta": 6.0, "hff": 1} -> "beta=6.0,hff=1" (the --defense_params form)."""
    return ",".join(f"{k}={v}" for k, v in params.items())


flags.DEFINE_list("defenses", list(table_names()), "Table rows, in order: defenses, or variants ("
                  + ", ".join(f"{v} = {b} with {params_text(p)}"
                              for v, (b, p) in VARIANTS.items()) + ").")
flags.DEFINE_string("model", "auto", "train.py's --model: auto (PreAct ResNet-18, width 8, on "
                    "Fashion-MNIST), small_cnn (the earlier table), ...")
flags.DEFINE_integer("width", 0, "train.py's --width (0: the model's default).")
flags.DEFINE_integer("epochs", 5, "Epochs of every run.")
flags.DEFINE_integer("train_size", 0, "First N training images (0: all 60,000).")
flags.DEFINE_integer("val_size", 1000, "Of those, held out for per-epoch validation.")
flags.DEFINE_integer("test_images", 1000, "Test images of every column but AutoAttack.")
flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attacks.")
flags.DEFINE_list("seeds", ["0"], "Seeds: each row is trained once per seed (see --seeds_for).")
flags.DEFINE_list("seeds_for", [], "Rows that get every seed of --seeds; the others get the "
                  "first one only. Default (empty): every row gets every seed.")
flags.DEFINE_integer("aa_images", 500, "Test images of the AutoAttack column (0: no AutoAttack).")
flags.DEFINE_list("aa_defenses", list(HEADLINE), "Rows that get the AutoAttack column.")
flags.DEFINE_string("memorization_scores", None, "train.py's --memorization_scores for the rows "
                    "that use them (bat). Default: the file `python benchmarks/memorization.py "
                    "--train_size=<--train_size>` writes, benchmarks/fashion_mnist_memorization"
                    "_<train_size>.npy (relative to the repository, where the script runs).")
flags.DEFINE_bool("cw", False, "Add the adaptive CW-∞ column (as the small-CNN table).")
flags.DEFINE_string("out_dir", None, "Folder of the runs, one subfolder <defense>/seed<k> per "
                    "run. Default: runs/defenses/<model>_w<width>.")
flags.DEFINE_bool("from_runs", False, "Train nothing: rebuild the table from the finished "
                  "runs in --out_dir (their results.json and model.keras), or from their "
                  "records in --records_dir where the run folder is gone.")
flags.DEFINE_string("records_dir", None, "Folder of the per-run records (configuration, "
                    "evaluation settings, measurements), one <defense>/seed<k>.json per run "
                    "(default benchmarks/records/defenses/<model>_w<width>).")
flags.DEFINE_bool("reevaluate", False, "Measure every run again instead of reusing the "
                  "measurements saved in its folder.")
flags.DEFINE_string("json", os.path.join(ROOT, "benchmarks", "defenses.json"),
                    "Where to write the table's rows as JSON.")
FLAGS = flags.FLAGS

EPS, STEP, PGD = 0.1, 0.025, "pgd20"
EVAL_FILE = "defenses_eval.json"
# Per-run measurements -> table columns, in table order (CW-∞ only with --cw).
COLUMNS = (("clean", "clean"), ("pgd20", "PGD-20"), ("aa", "AutoAttack"),
           ("pgd20_combined", "PGD-20 official (CE + 2·CE aux)"),
           ("pgd20_main", "PGD-20 main head"), ("pgd20_mask", "PGD-20 mask-choice"),
           ("aux_clean", "aux head clean"), ("aux_pgd20", "aux head PGD-20 (aux loss)"),
           ("agree_clean", "agree clean"), ("agree_pgd20", "agree PGD-20 (aux loss)"),
           ("worst_class_pgd20", "worst-class PGD-20"), ("cw", "CW-∞"),
           ("train_seconds", "train s"))
SAME_AS_PGD20 = ("pgd20_combined", "pgd20_main", "pgd20_mask")  # "=" without aux heads
AUX_ONLY = ("aux_clean", "aux_pgd20", "agree_clean", "agree_pgd20")  # "—" without aux heads
RUN_ERRORS = (ValueError, OSError, FloatingPointError, KeyError)


class Failure(Exception):
    """One run cannot be trained or measured; the message says why."""


def resolved_model():
    """(model name, width) that --model/--width resolve to on Fashion-MNIST."""
    from again_tf import training

    cfg, _ = training.resolve(training.TrainConfig(dataset="fashion_mnist", model=FLAGS.model,
                                                   width=FLAGS.width))
    return cfg.model, cfg.width


def seeds_of(defense):
    """The seeds of a row: all of --seeds, or the first only outside --seeds_for."""
    seeds = [int(s) for s in FLAGS.seeds]
    return seeds if not FLAGS.seeds_for or defense in FLAGS.seeds_for else seeds[:1]


def with_aa(defense):
    return FLAGS.aa_images > 0 and defense in FLAGS.aa_defenses


def memorization_scores(base):
    """--memorization_scores of a run of `base`: None unless the defense uses them."""
    if not registry.needs(base, "uses_index"):
        return None
    return FLAGS.memorization_scores or memorization_file("fashion_mnist", FLAGS.train_size)


def train_config(defense, seed, run_dir):
    from again_tf import training

    base, _ = VARIANTS.get(defense, (defense, {}))
    return training.TrainConfig(
        defense=base, dataset="fashion_mnist", model=FLAGS.model, width=FLAGS.width,
        epochs=FLAGS.epochs, batch_size=128, optimizer="adam", lr=1e-3, eps=EPS,
        step_size=STEP, attack_steps=FLAGS.attack_steps, eval_steps=10,
        val_size=FLAGS.val_size, train_size=FLAGS.train_size, test_images=FLAGS.test_images,
        test_attacks=("clean",),  # the robust columns are measured here, once
        defense_params=recipe_params(defense), memorization_scores=memorization_scores(base),
        seed=seed, out_dir=run_dir, verbose=0)


def train_command(cfg):
    """The train.py command that makes the run `cfg` (same folder, same configuration)."""
    args = [f"--defense={cfg.defense}"]
    if cfg.defense_params:
        args.append(f"--defense_params={params_text(cfg.defense_params)}")
    if cfg.memorization_scores:
        args.append(f"--memorization_scores={cfg.memorization_scores}")
    args += [f"--model={cfg.model}"] + ([f"--width={cfg.width}"] if cfg.width else [])
    args += [f"--epochs={cfg.epochs}", f"--train_size={cfg.train_size}",
             f"--val_size={cfg.val_size}", f"--test_images={cfg.test_images}",
             f"--test_attacks={','.join(cfg.test_attacks)}", f"--eps={cfg.eps}",
             f"--step_size={cfg.step_size}", f"--attack_steps={cfg.attack_steps}",
             f"--eval_steps={cfg.eval_steps}", "--optimizer=adam", f"--lr={cfg.lr}",
             f"--batch_size={cfg.batch_size}", f"--seed={cfg.seed}", f"--out_dir={cfg.out_dir}"]
    return shlex.join(["python", "train.py"] + args)


def row_command(defense, out_dir, default_out_dir):
    """The benchmarks/defenses.py command that trains (or reuses) and measures one row."""
    args = [f"--defenses={defense}", f"--seeds={','.join(map(str, seeds_of(defense)))}",
            f"--model={FLAGS.model}"] + ([f"--width={FLAGS.width}"] if FLAGS.width else [])
    args += [f"--epochs={FLAGS.epochs}", f"--train_size={FLAGS.train_size}",
             f"--val_size={FLAGS.val_size}", f"--test_images={FLAGS.test_images}",
             f"--attack_steps={FLAGS.attack_steps}"]
    args += ([f"--aa_images={FLAGS.aa_images}", f"--aa_defenses={defense}"] if with_aa(defense)
             else ["--aa_images=0"])
    args += ["--cw"] if FLAGS.cw else []
    if FLAGS.memorization_scores and registry.needs(base_defense(defense)[0], "uses_index"):
        args.append(f"--memorization_scores={FLAGS.memorization_scores}")
    if out_dir != default_out_dir:
        args.append(f"--out_dir={out_dir}")
    args.append(f"--json={os.path.join(out_dir, defense + '.json')}")
    return shlex.join(["python", "benchmarks/defenses.py"] + args)


def same_config(previous, cfg):
    """True if a run's saved configuration (run.json) is the one `cfg` would train."""
    return not config_differences(previous, cfg)


def finished(cfg):
    """True if `cfg.out_dir` holds a finished run of the same configuration."""
    done = os.path.join(cfg.out_dir, "results.json")
    run_file = os.path.join(cfg.out_dir, "run.json")
    if not (os.path.exists(done) and os.path.exists(run_file)):
        return False
    with open(run_file) as f:
        return same_config(json.load(f), cfg)


def train_run(defense, seed, run_dir):
    """Trains the run of (defense, seed) in `run_dir`, or skips/resumes it; returns its
    train.py command."""
    from again_tf import training

    cfg = train_config(defense, seed, run_dir)
    if finished(cfg):
        print(f"{defense} seed {seed}: finished run in {run_dir}, not retrained", flush=True)
        return train_command(cfg)
    resume = os.path.exists(os.path.join(run_dir, "run.json"))
    print(f"{defense} seed {seed}: {'resuming' if resume else 'training'} in {run_dir} ...",
          flush=True)
    try:
        training.train(dataclasses.replace(cfg, resume=resume))
    except training.RunError as e:  # e.g. a run of another configuration in the folder
        raise Failure(str(e)) from None
    return train_command(cfg)


def eval_settings(defense):
    """What a run's measurements depend on besides the run and its model file."""
    return {"test_images": FLAGS.test_images, "aa_images": FLAGS.aa_images if with_aa(defense)
            else 0, "cw": FLAGS.cw, "eps": EPS, "step_size": STEP, "attack": PGD, "version": 1}


def model_settings(run_dir, defense):
    """eval_settings and the model file's size and time: measurements are reused only if
    all are equal."""
    stat = os.stat(os.path.join(run_dir, "model.keras"))
    return {**eval_settings(defense), "model_file": [stat.st_size, stat.st_mtime_ns]}


def record_path(records_dir, defense, seed):
    return os.path.join(records_dir, defense, f"seed{seed}.json")


def write_record(records_dir, defense, seed, run_dir, measured):
    """Keeps a run's configuration, evaluation settings and measurements where git can."""
    with open(os.path.join(run_dir, "run.json")) as f:
        config = json.load(f)
    for key in NOT_CONFIGURATION:
        config.pop(key, None)
    path = record_path(records_dir, defense, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"defense": defense, "seed": seed, "config": config,
                   "settings": eval_settings(defense), "measured": measured}, f, indent=2)
        f.write("\n")


def from_record(records_dir, defense, seed, run_dir):
    """The measurements of a run whose folder is gone, from its record; Failure if there is
    none or it was made with another configuration or other evaluation settings."""
    path = record_path(records_dir, defense, seed)
    if not os.path.exists(path):
        raise Failure(f"no finished run in {run_dir} and no record {path}")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise Failure(f"the record {path} is unreadable: {' '.join(str(e).split())}") from e
    if not isinstance(record, dict):
        raise Failure(f"the record {path} is unreadable: not a JSON object")
    keys = {"config", "settings", "measured"} - set(record)
    if keys:
        raise Failure(f"the record {path} lacks {', '.join(sorted(keys))}")
    if not same_config(record["config"], train_config(defense, seed, run_dir)):
        raise Failure(f"the record {path} is of another training configuration")
    if record["settings"] != eval_settings(defense):
        raise Failure(f"the record {path} was measured with other settings: "
                      f"{record['settings']}, not {eval_settings(defense)}")
    print(f"{defense} seed {seed}: no model in {run_dir}; measurements from {path}",
          flush=True)
    return record["measured"]


def measure(defense, run_dir):
    """The per-run measurements of the table's columns (module docstring), reused from
    `run_dir`/defenses_eval.json when its settings are unchanged."""
    cache = os.path.join(run_dir, EVAL_FILE)
    with open(os.path.join(run_dir, "results.json")) as f:
        result = json.load(f)
    with open(os.path.join(run_dir, "run.json")) as f:
        cfg = json.load(f)
    settings = model_settings(run_dir, defense)
    if os.path.exists(cache) and not FLAGS.reevaluate:
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("settings") == settings:
            return saved["measured"]
    start = time.time()
    measured = attack_run(run_dir, cfg, settings)
    measured.update(train_seconds=result["train_seconds"], epochs=result.get("epochs"),
                    eval_seconds=round(time.time() - start, 1))
    with open(cache, "w") as f:
        json.dump({"settings": settings, "measured": measured}, f, indent=2)
    return measured


def attack_run(run_dir, cfg, settings):
    """Runs the attacks of the table on one saved model."""
    import keras
    import numpy as np

    from again_tf import data, evaluation, layers, models  # noqa: F401  (registers them)
    from again_tf.analysis import heads

    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    n_aa = settings["aa_images"]
    x, y = data.load_arrays("fashion_mnist", f"test[:{max(FLAGS.test_images, n_aa)}]")
    x = x.astype(np.float32) / 255
    xt, yt = x[:FLAGS.test_images], y[:FLAGS.test_images]
    common = dict(eps=EPS, step_size=STEP, seed=cfg["seed"])
    attacks = ["clean", PGD] + (["cw"] if settings["cw"] else [])
    scores = evaluation.evaluate(model, xt, yt, attacks, loss="adaptive", **common)
    pgd = scores[PGD]
    per_class = [float(pgd["correct"][yt == c].mean()) for c in np.unique(yt)]
    m = {"clean": scores["clean"]["accuracy"], "pgd20": pgd["accuracy"],
         "worst_class_pgd20": min(per_class), "worst_class": int(np.unique(yt)[
             int(np.argmin(per_class))]), "aux_heads": heads.num_heads(model, xt)}
    if settings["cw"]:
        m["cw"] = scores["cw"]["accuracy"]
    if m["aux_heads"]:
        # Each objective's PGD-20 starts from the same seed: the adaptive run's per-objective
        # entries are what loss="main"/"combined"/... alone give.
        correct = dict(pgd["correct_by_loss"])
        for objective in ("main_relaxed", "combined_relaxed"):
            if objective not in correct:
                correct[objective] = evaluation.evaluate(
                    model, xt, yt, [PGD], loss=objective, **common)[PGD]["correct"]
        mask = correct["main_relaxed"] & correct["combined_relaxed"]
        m.update(pgd20_main=float(correct["main"].mean()),
                 pgd20_combined=float(correct["combined"].mean()),
                 pgd20_mask=float(mask.mean()),
                 pgd20_main_relaxed=float(correct["main_relaxed"].mean()),
                 pgd20_combined_relaxed=float(correct["combined_relaxed"].mean()),
                 pgd20_all=float((mask & pgd["correct"]).mean()))  # worst of all five
        # PGD-20 on the auxiliary loss (evaluate returns predictions, not the examples).
        attack = evaluation.parse_attack(PGD, model, EPS, STEP, seed=cfg["seed"])
        x_aux = evaluation.adversarial(attack, xt, yt, loss_fn=evaluation.build_objective(
            "aux", model, attack.loss))
        rep = heads.head_report(model, xt, yt, x_aux)
        m.update(aux_clean=rep["aux_clean"], aux_pgd20=rep["aux_adv"],
                 agree_clean=rep["agree_clean"], agree_pgd20=rep["agree_adv"],
                 aux_attack_main=rep["main_adv"],  # = the adaptive run's "aux" entry
                 aux_head_index=rep["head"])
        if "aux" in correct and abs(rep["main_adv"] - float(correct["aux"].mean())) > 1e-9:
            print(f"note: {run_dir}: the aux-loss PGD-20 here gives main accuracy "
                  f"{rep['main_adv']:.4f}, the adaptive run's aux entry "
                  f"{float(correct['aux'].mean()):.4f}", file=sys.stderr)
    if n_aa:
        aa = evaluation.evaluate(model, x[:n_aa], y[:n_aa], ["aa"], loss="adaptive",
                                 **common)["aa"]
        m.update(aa=aa["accuracy"], aa_images=n_aa, aa_after=aa.get("accuracy_after"))
    return m


def aggregate(defense, runs, command):
    """A table row from its runs' measurements: mean and half-range per column."""
    import numpy as np

    row = {"defense": defense, "base_defense": VARIANTS.get(defense, (defense,))[0],
           "defense_params": recipe_params(defense), "seeds": [r["seed"] for r in runs],
           "aux_heads": runs[0]["measured"]["aux_heads"], "command": command,
           "spread": {}, "runs": runs}
    keys = [k for k, _ in COLUMNS] + ["pgd20_main_relaxed", "pgd20_combined_relaxed",
                                      "pgd20_all", "eval_seconds"]
    for key in keys:
        values = [r["measured"][key] for r in runs if r["measured"].get(key) is not None]
        if values:
            row[key] = float(np.mean(values))
            row["spread"][key] = (max(values) - min(values)) / 2
        else:
            row[key] = None
    return row


def cell(row, key):
    value = row.get(key)
    if value is None:
        if not row["aux_heads"] and key in SAME_AS_PGD20:
            return "="
        if not row["aux_heads"] and key in AUX_ONLY:
            return "—"
        return "·"
    digits = 0 if key == "train_seconds" else 3
    text = f"{value:.{digits}f}"
    if len(row["seeds"]) > 1:
        text += f" ± {row['spread'][key]:.{digits}f}"
    return text


def columns():
    return [(k, h) for k, h in COLUMNS
            if (k != "cw" or FLAGS.cw) and (k != "aa" or FLAGS.aa_images > 0)]


def markdown(rows):
    cols = columns()
    headers = ["defense", "seeds"] + [
        h + (f" ({FLAGS.aa_images} img)" if k == "aa" else "") for k, h in cols]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["defense"], ",".join(map(str, r["seeds"]))] + [cell(r, k) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_flags():
    names = table_names()
    for flag in ("defenses", "seeds_for", "aa_defenses"):
        unknown = [d for d in getattr(FLAGS, flag) if d not in names]
        if unknown:
            sys.exit(f"defenses.py: error: --{flag} has unknown {unknown}; expected some of "
                     f"{', '.join(names)}")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        sys.exit(f"defenses.py: error: --seeds={','.join(FLAGS.seeds)}: expected integers "
                 f"separated by commas, e.g. 0,1,2")
    if not seeds or len(set(seeds)) != len(seeds):
        sys.exit(f"defenses.py: error: --seeds={','.join(FLAGS.seeds)}: expected at least one "
                 f"seed, none repeated")
    for flag in ("test_images", "epochs", "attack_steps"):
        if getattr(FLAGS, flag) < 1:
            sys.exit(f"defenses.py: error: --{flag}={getattr(FLAGS, flag)} must be at least 1")
    from again_tf import models

    if FLAGS.model != "auto" and FLAGS.model not in models.MODELS:
        sys.exit(f"defenses.py: error: --model={FLAGS.model!r} is unknown; expected auto or one "
                 f"of {', '.join(models.MODELS)}")
    if FLAGS.aa_images < 0:
        sys.exit(f"defenses.py: error: --aa_images={FLAGS.aa_images} must be >= 0 (0: no "
                 f"AutoAttack)")


def main(argv):
    del argv
    import warnings

    import tensorflow as tf
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TF's SavedModel export logs INFO through absl
    tf.get_logger().setLevel("ERROR")  # one retracing note per new model, not a problem
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    check_flags()
    try:
        model, width = resolved_model()
    except ValueError as e:
        sys.exit(f"defenses.py: error: {e}")
    default_out_dir = os.path.join("runs", "defenses", f"{model}_w{width}")
    out_dir = FLAGS.out_dir or default_out_dir
    records_dir = FLAGS.records_dir or os.path.join(ROOT, "benchmarks", "records", "defenses",
                                                    f"{model}_w{width}")
    rows, failed = [], {}
    for defense in FLAGS.defenses:
        runs = []
        for seed in seeds_of(defense):
            run_dir = os.path.join(out_dir, defense, f"seed{seed}")
            try:  # one run's bad input must not cost the others
                if FLAGS.from_runs:
                    command = train_command(train_config(defense, seed, run_dir))
                else:
                    command = train_run(defense, seed, run_dir)
                if FLAGS.from_runs and not os.path.exists(os.path.join(run_dir, "model.keras")):
                    measured = from_record(records_dir, defense, seed, run_dir)
                else:
                    measured = measure(defense, run_dir)
                    write_record(records_dir, defense, seed, run_dir, measured)
            except (Failure, *RUN_ERRORS) as e:
                message = " ".join(str(e).split())
                failed.setdefault(defense, {})[str(seed)] = message
                print(f"{defense} failed (seed {seed}): {message}", file=sys.stderr, flush=True)
                continue
            runs.append({"seed": seed, "run_dir": run_dir, "train_command": command,
                         "evaluate_command": shlex.join([
                             "python", "evaluate.py", f"--model_path={run_dir}",
                             f"--attacks=clean,{PGD}", f"--num_images={FLAGS.test_images}",
                             f"--step_size={STEP}", f"--seed={seed}"]),
                         "measured": measured})
        if runs:
            rows.append(aggregate(defense, runs, row_command(defense, out_dir,
                                                             default_out_dir)))
    if not rows:
        sys.exit(f"defenses.py: error: every defense failed: {failed}")
    seeds = ",".join(FLAGS.seeds)
    print(f"\nFashion-MNIST, {model} (width {width}), {FLAGS.epochs} epoch(s) on "
          f"{FLAGS.train_size or 60000} - {FLAGS.val_size} images, ε 0.1, seeds {seeds}"
          + (f" (other rows: {FLAGS.seeds[0]})" if FLAGS.seeds_for else "")
          + f"; accuracy on {FLAGS.test_images} test images"
          + (f", AutoAttack on {FLAGS.aa_images}" if FLAGS.aa_images else "")
          + "; mean ± (max − min)/2 over the seeds. '=': no auxiliary heads, the PGD-20 "
          "column; '—': no auxiliary head; '·': not measured.\n")
    print(markdown(rows))
    print("\nEach row, reproduced (trains the runs missing in its folder, then measures):")
    for r in rows:
        print(f"- {r['defense']}: `{r['command']}`")
    print("\nEach run (train.py; `python evaluate.py --model_path=<its --out_dir>` re-attacks it):")
    for r in rows:
        for run in r["runs"]:
            print(f"- {r['defense']} seed {run['seed']}: `{run['train_command']}`")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
        json.dump({"model": model, "width": width, "model_flag": FLAGS.model,
                   "epochs": FLAGS.epochs, "train_size": FLAGS.train_size,
                   "val_size": FLAGS.val_size, "test_images": FLAGS.test_images,
                   "aa_images": FLAGS.aa_images, "aa_defenses": FLAGS.aa_defenses,
                   "attack_steps": FLAGS.attack_steps, "eps": EPS, "step_size": STEP,
                   "seeds": [int(s) for s in FLAGS.seeds], "seeds_for": FLAGS.seeds_for,
                   "spread": "(max - min) / 2 over the seeds", "runs": out_dir,
                   "rows": rows, "failed": failed}, f, indent=2)
    print(f"\nRows written to {FLAGS.json}; runs in {out_dir}; records in {records_dir}")
    if failed:
        shown = {r["defense"] for r in rows}
        out = [d for d in failed if d not in shown]
        partial = [f"{d} (seed {', '.join(failed[d])})" for d in failed if d in shown]
        sys.exit(f"defenses.py: error: {len(failed)} defense(s) failed"
                 + (f", left out of the table: {', '.join(out)}" if out else "")
                 + (f"; rows without the failed seeds: {', '.join(partial)}" if partial else "")
                 + " (messages above)")


if __name__ == "__main__":
    app.run(main)
