"""Channel-wise activations of natural vs PGD inputs for a saved model (CAS / CIFS figures).

    python benchmarks/channel_analysis.py --model_path=runs/x                # run folder
    python benchmarks/channel_analysis.py --model_path=m.keras --num_images=300 --out=plots

Loads `--model_path` (a `.keras` file of an `again_tf.models.Classifier`, or a train.py run
folder: its model.keras, and its run.json's dataset and ε unless flags say otherwise), takes
the first `--num_images` test images, attacks them with PGD (`--steps`=10, ε and step size
from the dataset unless given) and measures the mean |activation| of every channel at
`--point` (default: the penultimate feature map) with `again_tf.analysis.channels`.
Writes to `--out` (default: `<model folder>/channels`):

- channels_magnitude.png: mean magnitude per channel, natural vs adversarial, channels
  sorted by natural magnitude (Bai et al., ICLR 2021, Fig. 1; Yan et al., ICML 2021);
- channels_frequency.png: per class, how often each channel is among the top-k
  activated (`--frequency=top_k`, our rule) or active above 1% of the example's largest
  activation (`--frequency=active`, the rule of CAS's official
  ActivationAnalysis/freq_dis_resnet18_base.py), natural and adversarial (same channel
  order);
- channels.json: the numbers behind both figures and the summary.

Prints clean and PGD accuracy, the total magnitude and how many channels hold 90% of the
magnitude for natural and adversarial inputs.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from script_cli import ScriptError, run_or_exit  # noqa: E402

flags.DEFINE_string("model_path", None, "A .keras file or a train.py run folder.")
flags.DEFINE_string("dataset", None, "Dataset (default: the run folder's run.json, else "
                    "fashion_mnist).")
flags.DEFINE_string("data_dir", None, "Folder with the dataset's files (see train.py).")
flags.DEFINE_integer("num_images", 500, "First N test images analysed.")
flags.DEFINE_string("eps", None, "L-inf radius of the PGD attack (default: run.json's, else "
                    "the dataset's); fractions such as 8/255 allowed.")
flags.DEFINE_string("step_size", None, "PGD step size (default: the dataset's, scaled by "
                    "eps / the dataset's eps).")
flags.DEFINE_integer("steps", 10, "PGD steps.")
flags.DEFINE_string("point", "penultimate", "Insertion point measured (see model.points).")
flags.DEFINE_enum("frequency", "top_k", ["top_k", "active"], "Frequency maps: top_k "
                  "(a channel counts when among the --top_k largest of the example; our "
                  "rule) or active (when above --active_threshold times the example's "
                  "largest activation; the official CAS script's rule).")
flags.DEFINE_integer("top_k", 0, "Channels counted per example with --frequency=top_k "
                     "(0: a quarter of the channels).")
flags.DEFINE_float("active_threshold", 0.01, "Fraction of the example's largest activation "
                   "above which a channel is active with --frequency=active (CAS: 0.01).")
flags.DEFINE_float("share", 0.9, "Share of the total magnitude for the channel count.")
flags.DEFINE_integer("batch_size", 250, "Images per batch.")
flags.DEFINE_integer("seed", 0, "Seed of PGD's random start.")
flags.DEFINE_string("out", None, "Output folder (default: <model folder>/channels).")
FLAGS = flags.FLAGS


def resolve(path):
    """(model file, run.json dict) for --model_path."""
    if not path:
        raise ScriptError("--model_path is required: a .keras file or a run folder")
    if os.path.isdir(path):
        model_file = os.path.join(path, "model.keras")
        if not os.path.isfile(model_file):
            raise ScriptError(f"--model_path={path} is a folder without model.keras "
                                       f"(expected a train.py run folder)")
    elif os.path.isfile(path) and path.endswith(".keras"):
        model_file = path
    else:
        raise ScriptError(f"--model_path={path} is not a .keras file or a run folder")
    run_json = os.path.join(os.path.dirname(os.path.abspath(model_file)), "run.json")
    run = {}
    if os.path.isfile(run_json):
        with open(run_json) as f:
            run = json.load(f) or {}
    return model_file, run


def plot(result, freq_nat, freq_adv, class_names, out, title, freq_label="top-k"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    c = len(result["order"])
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, c / 8)), 3.5))
    ax.bar(np.arange(c), result["adversarial"], width=1.0, color="tab:red", alpha=0.6,
           label="adversarial")
    ax.bar(np.arange(c), result["natural"], width=1.0, color="tab:blue", alpha=0.6,
           label="natural")
    ax.set_xlabel("channel (sorted by natural magnitude)")
    ax.set_ylabel("mean |activation|")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    magnitude_png = os.path.join(out, "channels_magnitude.png")
    fig.savefig(magnitude_png, dpi=120)
    plt.close(fig)

    order = result["order"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, min(18.0, c / 4)), 4.0), sharey=True)
    for ax, freq, name in zip(axes, (freq_nat, freq_adv), ("natural", "adversarial")):
        im = ax.imshow(freq[:, order], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ax.set_title(f"{name}: {freq_label} frequency")
    fig.supxlabel("channel (sorted by natural magnitude)")
    axes[0].set_yticks(range(len(class_names)))
    axes[0].set_yticklabels(class_names, fontsize=7)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8)
    frequency_png = os.path.join(out, "channels_frequency.png")
    fig.savefig(frequency_png, dpi=120)
    plt.close(fig)
    return magnitude_png, frequency_png


def run():
    import keras
    import numpy as np

    import again_tf  # noqa: F401  (registers the again_tf layers and models)
    from again_tf import attacks, data
    from again_tf.analysis import channels
    from again_tf.models.base import Classifier
    from again_tf.cli import definitions

    model_file, run_info = resolve(FLAGS.model_path)
    dataset = FLAGS.dataset or run_info.get("dataset") or "fashion_mnist"
    info = data.info(dataset)
    try:
        model = keras.saving.load_model(model_file, compile=False)
    except Exception as e:
        raise ScriptError(f"--model_path={model_file}: cannot load the model "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:300]})")
    if not isinstance(model, Classifier):
        raise ScriptError(f"--model_path={model_file} holds a {type(model).__name__}; "
                                   f"expected an again_tf.models.Classifier")
    if FLAGS.point not in model.points:
        raise ScriptError(f"--point={FLAGS.point} is not a point of "
                                   f"{type(model).__name__}; expected one of "
                                   f"{', '.join(model.points)}")
    if FLAGS.num_images < 1:
        raise ScriptError(f"--num_images={FLAGS.num_images}; expected >= 1")
    eps = definitions.fraction(FLAGS.eps, "eps") or run_info.get("eps") or info.eps
    step_size = (definitions.fraction(FLAGS.step_size, "step_size")
                 or info.step_size * eps / info.eps)

    x, y = data.load_arrays(dataset, f"test[:{FLAGS.num_images}]", FLAGS.data_dir)
    x = x.astype(np.float32) / 255.0
    y = y.astype(np.int64)
    attack = attacks.PGD(model, eps=eps, step_size=step_size, steps=FLAGS.steps,
                         seed=FLAGS.seed)
    result = channels.natural_vs_adversarial(model, x, y, attack, point=FLAGS.point,
                                             batch_size=FLAGS.batch_size)
    nat_acts, adv_acts = result["natural_activations"], result["adversarial_activations"]
    num_channels = nat_acts.shape[1]
    top_k = FLAGS.top_k or channels.default_top_k(num_channels)
    if not 1 <= top_k <= num_channels:
        raise ScriptError(f"--top_k={FLAGS.top_k}; expected 0 or 1..{num_channels}")
    if not 0.0 <= FLAGS.active_threshold < 1.0:
        raise ScriptError(f"--active_threshold={FLAGS.active_threshold}; expected [0, 1)")
    if FLAGS.frequency == "active":
        freq_label = f"active > {FLAGS.active_threshold:g} max"
        freq_nat, freq_adv = (channels.active_frequency(a, y, info.num_classes,
                                                        FLAGS.active_threshold)
                              for a in (nat_acts, adv_acts))
    else:
        freq_label = f"top-{top_k}"
        freq_nat, freq_adv = (channels.channel_frequency(a, y, info.num_classes, top_k)
                              for a in (nat_acts, adv_acts))

    def accuracy(images):
        logits = np.concatenate([np.asarray(model(images[i:i + FLAGS.batch_size]))
                                 for i in range(0, len(images), FLAGS.batch_size)])
        return float((logits.argmax(1) == y).mean())

    summary = {
        "model_path": model_file, "dataset": dataset, "point": FLAGS.point,
        "num_images": int(len(y)), "eps": float(eps), "step_size": float(step_size),
        "steps": FLAGS.steps, "channels": int(num_channels), "frequency": FLAGS.frequency,
        "top_k": int(top_k), "active_threshold": FLAGS.active_threshold,
        "share": FLAGS.share,
        "clean_accuracy": accuracy(x), "pgd_accuracy": accuracy(result["x_adv"]),
        "natural_total": float(result["natural"].sum()),
        "adversarial_total": float(result["adversarial"].sum()),
        "natural_channels_for_share": channels.channels_for_share(result["natural"],
                                                                  FLAGS.share),
        "adversarial_channels_for_share": channels.channels_for_share(result["adversarial"],
                                                                      FLAGS.share),
        # how different the class-wise channel usage becomes: mean |F_adv - F_nat|
        "frequency_shift": float(np.abs(freq_adv - freq_nat).mean()),
    }
    out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(model_file)), "channels")
    os.makedirs(out, exist_ok=True)
    title = (f"{os.path.basename(os.path.dirname(os.path.abspath(model_file)))} "
             f"({FLAGS.point}, PGD-{FLAGS.steps} eps={eps:g})")
    pngs = plot(result, freq_nat, freq_adv, info.class_names, out, title, freq_label)
    with open(os.path.join(out, "channels.json"), "w") as f:
        json.dump({**summary, "order": result["order"].tolist(),
                   "natural": result["natural"].tolist(),
                   "adversarial": result["adversarial"].tolist(),
                   "frequency_natural": freq_nat.tolist(),
                   "frequency_adversarial": freq_adv.tolist()}, f, indent=1)

    pct = int(round(100 * FLAGS.share))
    print(f"{model_file}: {len(y)} {dataset} test images, {num_channels} channels at "
          f"{FLAGS.point}, PGD-{FLAGS.steps} eps={eps:g}")
    print(f"  accuracy: clean {summary['clean_accuracy']:.3f}, "
          f"PGD {summary['pgd_accuracy']:.3f}")
    print(f"  total mean magnitude: natural {summary['natural_total']:.3f}, "
          f"adversarial {summary['adversarial_total']:.3f} "
          f"(x{summary['adversarial_total'] / max(summary['natural_total'], 1e-12):.2f})")
    print(f"  channels holding {pct}% of the magnitude: natural "
          f"{summary['natural_channels_for_share']}/{num_channels}, adversarial "
          f"{summary['adversarial_channels_for_share']}/{num_channels}")
    print(f"  {freq_label} frequency shift (mean |F_adv - F_nat|): "
          f"{summary['frequency_shift']:.3f}")
    print(f"  wrote {pngs[0]}, {pngs[1]}, {os.path.join(out, 'channels.json')}")
    return summary


def main(argv):
    del argv
    run_or_exit(run)


if __name__ == "__main__":
    app.run(main)
