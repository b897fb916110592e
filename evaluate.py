"""Evaluates a trained classifier's robustness under named attacks, from the command line.

    python evaluate.py --model_path=runs/x --attacks=clean,pgd20,cw,aa --num_images=1000

`--model_path` is a `.keras` file (from train.py or any Keras classifier of [0, 1] images
that outputs logits) or a train.py run folder (its model.keras, or best.keras with
--checkpoint=best; its run.json gives the dataset, ε and norm unless flags say
otherwise). Prints the table and writes a JSON report, a Markdown table and, with
--classwise (default), the class-wise report (JSON + PNG plots); --sanity adds the
gradient-masking checks. `--help` lists the flags.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from again_tf import catalog  # noqa: E402
from again_tf.cli import definitions  # noqa: E402
from again_tf.cli import help as cli_help  # noqa: E402

definitions.define_evaluate()
FLAGS = flags.FLAGS


class EvaluateError(Exception):
    """Bad input; the message says what in one line."""


def one_line(text):
    return " ".join(str(text).split())


def resolve_model_path(path, checkpoint):
    """(model file, run folder or None) for --model_path."""
    if not path:
        raise EvaluateError("--model_path is required: a .keras file or a train.py run folder")
    if os.path.isdir(path):
        name = "best.keras" if checkpoint == "best" else "model.keras"
        model_file = os.path.join(path, name)
        if not os.path.isfile(model_file):
            raise EvaluateError(f"--model_path={path} is a folder without {name} (expected a "
                                f"train.py run folder)")
        return model_file, path
    if not os.path.isfile(path):
        raise EvaluateError(f"--model_path={path} does not exist")
    if not path.endswith(".keras"):
        raise EvaluateError(f"--model_path={path} is not a .keras file or a run folder")
    folder = os.path.dirname(os.path.abspath(path))
    return path, folder if os.path.isfile(os.path.join(folder, "run.json")) else None


def settings(run_folder):
    """Dataset, ε, step and norm: flags given explicitly, else run.json, else defaults."""
    from again_tf import checkpoint, data

    run = {}
    if run_folder is not None:
        run = checkpoint.read_json(os.path.join(run_folder, "run.json"), {}) or {}
    dataset = FLAGS.dataset if FLAGS["dataset"].present or "dataset" not in run else run["dataset"]
    info = data.info(dataset)
    eps = definitions.fraction(FLAGS.eps, "eps") if FLAGS["eps"].present else None
    eps = eps if eps is not None else run.get("eps") or info.eps
    if not 0.0 < eps <= 1.0:
        raise EvaluateError(f"--eps={FLAGS.eps} is outside (0, 1]: it is in [0, 1] pixel "
                            f"units (for 8/255 pass --eps=8/255)")
    step = definitions.fraction(FLAGS.step_size, "step_size") if FLAGS["step_size"].present \
        else None
    step = step if step is not None else run.get("step_size") or eps / 4
    if not 0.0 < step <= 1.0:
        raise EvaluateError(f"--step_size={FLAGS.step_size} is outside (0, 1]")
    norm = FLAGS.norm if FLAGS["norm"].present or "norm" not in run else run["norm"]
    return dataset, info, float(eps), float(step), norm


def attack_options():
    return {name: getattr(FLAGS, name) for name in catalog.ATTACK_OPTIONS}


def validate():
    """Checks the flags that need no model or data; raises EvaluateError/ValueError."""
    from again_tf import evaluation

    if not FLAGS.attacks:
        raise EvaluateError("--attacks is empty; expected e.g. clean,pgd20,cw,aa")
    for name in FLAGS.attacks:
        try:
            evaluation.parse_attack(name, None, 0.1, **attack_options())
        except ValueError as e:
            raise EvaluateError(f"--attacks: {e}") from None
    if FLAGS.eps is not None:
        eps = definitions.fraction(FLAGS.eps, "eps")
        if eps is not None and not 0.0 < eps <= 1.0:
            raise EvaluateError(f"--eps={FLAGS.eps} is outside (0, 1]: it is in [0, 1] pixel "
                                f"units (for 8/255 pass --eps=8/255)")
    for flag in ("num_images", "sanity_images"):
        if getattr(FLAGS, flag) < 0:
            raise EvaluateError(f"--{flag}={getattr(FLAGS, flag)} must be >= 0")
    for flag in [n for n, v in catalog.ATTACK_OPTIONS.items() if isinstance(v, int)] + [
            "batch_size"]:
        if getattr(FLAGS, flag) < 1:
            raise EvaluateError(f"--{flag}={getattr(FLAGS, flag)} must be at least 1")
    if FLAGS.temperature <= 0:
        raise EvaluateError(f"--temperature={FLAGS.temperature} must be > 0")
    if FLAGS.loss not in evaluation.loss_modes():
        raise EvaluateError(f"--loss={FLAGS.loss!r} is unknown. Expected one of: "
                            f"{', '.join(evaluation.loss_modes())}")
    if FLAGS.split_by_memorization and not FLAGS.memorization_scores:
        raise EvaluateError("--split_by_memorization needs --memorization_scores=<.npy or .npz "
                            "file of per-example scores of --memorization_split>")


def memorization_report(model, results, num_test, dataset, eps, step, norm):
    """--split_by_memorization: accuracy on the typical and atypical examples.

    The scores index --memorization_split; for "test" the main evaluation's results are
    split, for "train" the first --num_images training examples are evaluated the same way.
    """
    import numpy as np

    from again_tf import data
    from again_tf.analysis import memorization

    scores = memorization.load_scores(FLAGS.memorization_scores)
    threshold = FLAGS.memorization_threshold
    if FLAGS.memorization_split == "test":
        if len(scores) < num_test:
            raise EvaluateError(f"--memorization_scores={FLAGS.memorization_scores} holds "
                                f"{len(scores)} scores; expected at least {num_test} (one per "
                                f"evaluated test image)")
        return memorization.split_results(results, scores[:num_test], threshold)
    split = f"train[:{FLAGS.num_images}]" if FLAGS.num_images else "train"
    x, y = data.load_arrays(dataset, split, FLAGS.data_dir)
    if len(scores) < len(y):
        raise EvaluateError(f"--memorization_scores={FLAGS.memorization_scores} holds "
                            f"{len(scores)} scores; expected at least {len(y)} (one per "
                            f"example of {split})")
    if FLAGS.verbose:
        print(f"Evaluating the first {len(y)} {dataset} training images by memorization...")
    return memorization.evaluate_by_memorization(
        model, x.astype(np.float32) / 255.0, y, scores[:len(y)], FLAGS.attacks, threshold,
        eps=eps, step_size=step, batch_size=FLAGS.batch_size, norm=norm, seed=FLAGS.seed,
        verbose=FLAGS.verbose, loss=FLAGS.loss, **attack_options())


def check_writable(base):
    """Creates the report's folder and checks a file can be written there: one line if not."""
    folder = os.path.dirname(os.path.abspath(base))
    probe = base + ".json.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.isdir(base + ".json"):
            raise IsADirectoryError(0, "is a folder", base + ".json")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        where = "--report" if FLAGS.report else "the default report"
        raise EvaluateError(f"{where} {base}.json cannot be written ({e.strerror or e}); pass "
                            f"--report=<writable path>.json") from None


def load_model(path, flag="model_path"):
    import zipfile

    import keras

    import again_tf  # noqa: F401  (registers the again_tf layers and models)

    if path.endswith(".keras") and os.path.isfile(path) and not zipfile.is_zipfile(path):
        # Keras would call it "File not found"; a .keras file is a zip archive.
        raise EvaluateError(f"--{flag}={path}: cannot load the model: the file is corrupt or "
                            f"truncated (a .keras file is a zip archive, and this one of "
                            f"{os.path.getsize(path)} bytes is not)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # corrupt zip, unknown layer, wrong format...
        raise EvaluateError(f"--{flag}={path}: cannot load the model "
                            f"({type(e).__name__}: {one_line(e)[:300]})") from None


def check_model(model, x, info, flag="model_path"):
    """The model must accept the dataset's images and return one logit per class."""
    import numpy as np

    try:
        out = np.asarray(model(x[:2], training=False))
    except Exception as e:
        raise EvaluateError(f"--{flag}: the model does not accept {info.name} images of shape "
                            f"{x.shape[1:]} ({type(e).__name__}: {one_line(e)[:200]})") from None
    if out.ndim != 2 or out.shape[1] != info.num_classes:
        raise EvaluateError(f"--{flag}: the model returns shape {out.shape[1:]} for "
                            f"{info.name}; expected ({info.num_classes},) logits")
    from again_tf.attacks.base import PROBABILITIES_WARNING, looks_like_probabilities

    if looks_like_probabilities(np.asarray(model(x[:16], training=False))):
        print(f"evaluate.py: warning: --{flag}: {PROBABILITIES_WARNING}", file=sys.stderr)


def report_paths(model_file):
    if FLAGS.report:
        base = FLAGS.report[:-5] if FLAGS.report.endswith(".json") else FLAGS.report
    else:
        folder = os.path.dirname(os.path.abspath(model_file))
        stem = os.path.splitext(os.path.basename(model_file))[0]
        base = os.path.join(folder, "eval" if stem == "model" else f"eval_{stem}")
    return base


ADAPTIVE_NOTE = ("The model has auxiliary heads: an attack marked (worst) ran on each "
                 "loss listed under it (main: its own loss on the main head; combined: "
                 "main + β·mean of the auxiliary heads, β the model's trained aux_weight; "
                 "aux: the auxiliary heads alone; "
                 "*_relaxed: the same with the gradient through the mask choice; "
                 "for AutoAttack, main is AutoAttack itself and the others APGD-CE on the "
                 "points it left robust) and an image counts as robust only if it "
                 "survived all of them.")


def head_summary(rep):
    """One paragraph on the last auxiliary head, clean images (`analysis.heads`)."""
    return (f"Auxiliary head at the last inserted layer (clean images): accuracy "
            f"{rep['aux_clean']:.3f}, same prediction as the model on {rep['agree_clean']:.3f} "
            f"of the images. The model is right on {rep['main_clean_aux_right']:.3f} of the "
            f"images this head gets right and on {rep['main_clean_aux_wrong']:.3f} of those it "
            f"gets wrong; these carry {100 * rep['loss_share_aux_wrong']:.1f}% of the model's "
            f"clean cross-entropy (mean {rep['loss_aux_wrong']:.2f} against "
            f"{rep['loss_aux_right']:.2f}; overall {rep['loss_clean']:.3f}, what Keras logs as "
            f"val_loss): the loss mostly measures how confident those mistakes are.")


def table_rows(results, worst):
    """Rows of the table: each attack (the worst case over its objectives when it ran on
    several, followed by one row per objective), AutoAttack's components, the worst case."""
    rows = []
    for name, r in results.items():
        rows.append({"attack": name + (" (worst)" if "by_loss" in r else ""),
                     "accuracy": r["accuracy"],
                     "correct": f"{int(r['correct'].sum())}/{len(r['correct'])}",
                     "seconds": f"{r['seconds']:.1f}"})
        for objective, correct in (r.get("correct_by_loss") or {}).items():
            rows.append({"attack": f"  {objective} loss", "accuracy": float(correct.mean()),
                         "correct": f"{int(correct.sum())}/{len(correct)}", "seconds": ""})
        for comp, acc in (r.get("accuracy_after") or {}).items():
            rows.append({"attack": f"  after {comp}", "accuracy": acc, "correct": "",
                         "seconds": ""})
    if worst is not None:
        rows.append({"attack": "worst case", "accuracy": worst["accuracy"],
                     "correct": f"{int(worst['correct'].sum())}/{len(worst['correct'])}",
                     "seconds": ""})
    return rows


def run():
    import numpy as np

    from again_tf import checkpoint, data, evaluation
    from again_tf.analysis import classwise, heads, sanity

    validate()
    started = time.time()
    model_file, run_folder = resolve_model_path(FLAGS.model_path, FLAGS.checkpoint)
    check_writable(report_paths(model_file))  # before any work, not after the evaluation
    dataset, info, eps, step, norm = settings(run_folder)
    model = load_model(model_file)
    split = f"test[:{FLAGS.num_images}]" if FLAGS.num_images else "test"
    x, y = data.load_arrays(dataset, split, FLAGS.data_dir)
    x = x.astype(np.float32) / 255.0
    check_model(model, x, info)
    verbose = FLAGS.verbose
    if verbose:
        print(f"Evaluating {model_file} on the first {len(y)} {dataset} test images, "
              f"eps={eps:.4g} ({norm}), attacks: {', '.join(FLAGS.attacks)}")
    results = evaluation.evaluate(model, x, y, FLAGS.attacks, eps=eps, step_size=step,
                                  batch_size=FLAGS.batch_size, norm=norm, seed=FLAGS.seed,
                                  verbose=verbose, loss=FLAGS.loss, **attack_options())
    attacked = [n for n in results if n != "clean"]
    worst = evaluation.worst_case(results, attacked) if len(attacked) > 1 else None
    rows = table_rows(results, worst)
    columns = ["attack", "accuracy", "correct", "seconds"]
    base = report_paths(model_file)
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    report = {
        "model_path": model_file, "dataset": dataset, "eps": eps, "step_size": step,
        "norm": norm, "num_images": int(len(y)), "seed": FLAGS.seed, "loss": FLAGS.loss,
        "attacks": {n: {"accuracy": r["accuracy"], "seconds": round(r["seconds"], 2),
                        **({"accuracy_after": r["accuracy_after"], "warnings": r["warnings"]}
                           if "accuracy_after" in r else {}),
                        **({"by_loss": r["by_loss"]} if "by_loss" in r else {})}
                    for n, r in results.items()},
        "worst_case": None if worst is None else {"accuracy": worst["accuracy"],
                                                  "attacks": attacked},
        "files": {"json": base + ".json", "markdown": base + ".md"},
    }
    markdown = [f"# Robustness of `{model_file}`", "",
                f"{dataset}, first {len(y)} test images, ε = {eps:.4g} ({norm}), "
                f"seed {FLAGS.seed}, attack loss: {FLAGS.loss}.", ""]
    if any("by_loss" in r for r in results.values()):
        markdown += [ADAPTIVE_NOTE, ""]
    markdown += [evaluation.format_markdown(rows, columns)]
    # AutoAttack's official checks (randomness, probabilities, zero gradients, Square).
    warned = [f"- {name}: {w}" for name, r in results.items() for w in r.get("warnings") or []]
    if warned:
        markdown += ["", "## Warnings", ""] + warned
    if FLAGS.classwise:
        rep = classwise.report(y, {n: r["predictions"] for n, r in results.items()},
                               num_classes=info.num_classes, class_names=info.class_names,
                               model=model)
        pngs = classwise.plot(rep, base)
        classwise.save_json(rep, base + "_classwise.json")
        report["classwise"] = {
            "worst_class": {n: e["worst_class"] for n, e in rep["attacks"].items()},
            "weight_norm_correlation": rep["weight_norm_correlation"]}
        report["files"].update(classwise=base + "_classwise.json", plots=pngs)
        markdown += ["", "## Class-wise", "", "```", classwise.summary(rep), "```", ""]
        markdown += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs]
    if FLAGS.sanity:
        m = FLAGS.sanity_images or len(y)
        surrogate = load_model(FLAGS.surrogate_path, "surrogate_path") \
            if FLAGS.surrogate_path else None
        if surrogate is not None:
            check_model(surrogate, x, info, "surrogate_path")
        if verbose:
            print(f"Sanity checks on {min(m, len(y))} images...")
        whitebox = {n: float(r["correct"][:m].mean()) for n, r in results.items()
                    if n != "clean"}
        checks = sanity.run_checks(model, x[:m], y[:m], eps, norm=norm,
                                   batch_size=FLAGS.batch_size, seed=FLAGS.seed, steps=20,
                                   step_size=step, whitebox=whitebox, surrogate=surrogate,
                                   verbose=0)
        report["sanity"] = checks
        markdown += ["", "## Sanity checks (Carlini et al. 2019)", "", "```",
                     sanity.format_report(checks), "```"]
    if FLAGS.split_by_memorization:
        from again_tf.analysis import memorization

        report["memorization"] = memorization_report(model, results, len(y), dataset, eps,
                                                     step, norm)
        markdown += ["", "## Typical and atypical examples (memorization)", "", "```",
                     memorization.format_split(report["memorization"]), "```"]
    head_text = None
    if heads.num_heads(model, x):
        rep_heads = heads.head_report(model, x, y, batch_size=FLAGS.batch_size)
        report["aux_head"] = {k: v for k, v in rep_heads.items() if not hasattr(v, "shape")}
        head_text = head_summary(rep_heads)
        markdown += ["", "## The auxiliary head the masks follow", "", head_text]
    checkpoint.write_json(base + ".json", report)
    with open(base + ".md", "w") as f:
        f.write("\n".join(markdown) + "\n")

    print(f"\nAccuracy on the first {len(y)} {dataset} test images, eps={eps:.4g} ({norm}):")
    if any("by_loss" in r for r in results.values()):
        print(ADAPTIVE_NOTE)
    print(evaluation.format_table(rows, columns))
    for name, r in results.items():
        for w in r.get("warnings") or []:
            print(f"Warning ({name}): {w}")
    if head_text:
        print("\n" + head_text)
    if FLAGS.classwise:
        print("\nClass-wise:\n" + classwise.summary(rep))
    if FLAGS.sanity:
        print("\nSanity checks:\n" + sanity.format_report(report["sanity"]))
        if report["sanity"]["failed"]:
            print(f"WARNING: sanity checks failed: {', '.join(report['sanity']['failed'])} — "
                  f"the evaluation may suffer from gradient masking")
    if FLAGS.split_by_memorization:
        from again_tf.analysis import memorization

        print(f"\nBy memorization ({FLAGS.memorization_split} split):\n"
              + memorization.format_split(report["memorization"]))
    print(f"\nSaved {base}.json, {base}.md" + (", class-wise JSON and PNGs" if FLAGS.classwise
                                                 else ""))
    total = time.time() - started  # loading, every attack, reports and plots
    per_attack = ", ".join(f"{name} {len(y) / max(r['seconds'], 1e-9):.2f}"
                           for name, r in results.items() if name != "clean")
    print(f"Throughput: {len(y)} images in {total:.2f} s for the whole evaluation "
          f"({len(y) / total:.2f} images/s); images/s per attack: {per_attack or '-'}")
    return report


def main(argv):
    del argv
    from absl import logging

    import tensorflow as tf

    # Every attack compiles its own function: TF's "retracing" notices are expected here.
    logging.set_verbosity(logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    try:
        run()
    except (ValueError, FileNotFoundError, EvaluateError) as e:
        sys.exit(f"evaluate.py: error: {one_line(e)}")
    except OSError as e:  # disk full while writing the report...
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        sys.exit(f"evaluate.py: error: {e.strerror or one_line(e)}{where}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    cli_help.run(main, __doc__)
