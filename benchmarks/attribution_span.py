"""Attribution span of saved models (AGAIN, Yin et al., CVPR 2023): who looks at more pixels.

    python benchmarks/attribution_span.py --models=runs/none,runs/again_pgd
    python benchmarks/attribution_span.py --models=a.keras,b.keras --num_images=100 \
        --method=grad,ig --out=plots

Loads every model of `--models` (`.keras` files, or train.py run folders: their
model.keras), takes the first `--num_images` test images of `--dataset` (default
fashion_mnist), computes attribution maps of the true class's logit with
`again_tf.analysis.attribution` (`grad`: |input gradient|, `ig`: Integrated Gradients
with a black baseline, `--steps`) and their span: the fraction of pixels holding 50% and
90% of the total absolute attribution (higher = spread over more of the input). Prints a
table and writes to `--out` (default ./attribution_span):

- attribution_maps_<method>.png: `--num_show` images with each model's |map| side by side;
- attribution_span_hist.png: histogram of the per-image 90% spans, one panel per method;
- attribution_span.json: the table.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

from script_cli import ScriptError, run_or_exit  # noqa: E402

flags.DEFINE_string("models", None, "Comma-separated .keras files or train.py run folders.")
flags.DEFINE_string("dataset", "fashion_mnist", "Dataset of the test images.")
flags.DEFINE_string("data_dir", None, "Folder with the dataset's files (see train.py).")
flags.DEFINE_integer("num_images", 200, "First N test images analysed.")
flags.DEFINE_string("method", "grad,ig", "Comma-separated attribution methods: grad, ig.")
flags.DEFINE_integer("steps", 32, "Riemann steps of Integrated Gradients.")
flags.DEFINE_integer("num_show", 6, "Images drawn in the map figure.")
flags.DEFINE_integer("batch_size", 100, "Images per gradient pass.")
flags.DEFINE_string("out", "attribution_span", "Output folder.")
FLAGS = flags.FLAGS

METHODS = ("grad", "ig")
SHARES = (0.5, 0.9)


def resolve(path):
    """(display name, model file) for one entry of --models."""
    if os.path.isdir(path):
        model_file = os.path.join(path, "model.keras")
        if not os.path.isfile(model_file):
            raise ScriptError(f"--models entry {path} is a folder without model.keras "
                                       f"(expected a train.py run folder)")
    elif os.path.isfile(path) and path.endswith(".keras"):
        model_file = path
    else:
        raise ScriptError(f"--models entry {path!r} is not a .keras file or a run "
                                   f"folder")
    stem = os.path.splitext(os.path.basename(model_file))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(model_file)))
    return (folder if stem in ("model", "best") else stem), model_file


def plot(x, maps, spans, names, methods, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pngs = []
    show = min(FLAGS.num_show, len(x))
    for method in methods:
        cols = 1 + len(names)
        fig, axes = plt.subplots(show, cols, figsize=(1.8 * cols, 1.8 * show), squeeze=False)
        for r in range(show):
            axes[r, 0].imshow(x[r].squeeze(), cmap="gray" if x.shape[-1] == 1 else None,
                              vmin=0, vmax=1)
            for c, name in enumerate(names, start=1):
                m = np.abs(maps[name][method][r])
                axes[r, c].imshow(m, cmap="hot", vmin=0, vmax=max(float(m.max()), 1e-12))
                axes[r, c].set_xlabel(f"span90 {spans[name][method][0.9][r]:.2f}", fontsize=7)
                if r == 0:
                    axes[r, c].set_title(name, fontsize=8)
            axes[r, 0].set_title("input" if r == 0 else "", fontsize=8)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"|attribution| ({method})", fontsize=9)
        fig.tight_layout()
        png = os.path.join(out, f"attribution_maps_{method}.png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        pngs.append(png)

    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.5), squeeze=False)
    bins = np.linspace(0, 1, 41)
    for ax, method in zip(axes[0], methods):
        for name in names:
            ax.hist(spans[name][method][0.9], bins=bins, alpha=0.5, label=name)
        ax.set_xlabel("attribution span (90% share)")
        ax.set_ylabel("images")
        ax.set_title(method)
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(out, "attribution_span_hist.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    pngs.append(png)
    return pngs


def run():
    import keras
    import numpy as np

    import again_tf  # noqa: F401  (registers the again_tf layers and models)
    from again_tf import data
    from again_tf.analysis import attribution

    if not FLAGS.models:
        raise ScriptError("--models is required: comma-separated .keras files or "
                                   "run folders")
    methods = [m.strip() for m in FLAGS.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ScriptError(f"--method={FLAGS.method}; expected a comma-separated "
                                   f"subset of {', '.join(METHODS)}")
    if FLAGS.num_images < 1:
        raise ScriptError(f"--num_images={FLAGS.num_images}; expected >= 1")
    entries = [resolve(p.strip()) for p in FLAGS.models.split(",") if p.strip()]
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):  # two run folders of the same name: use the paths
        names = [f for _, f in entries]

    x, y = data.load_arrays(FLAGS.dataset, f"test[:{FLAGS.num_images}]", FLAGS.data_dir)
    x = x.astype(np.float32) / 255.0
    y = y.astype(np.int64)
    maps, spans, rows = {}, {}, []
    for name, (_, model_file) in zip(names, entries):
        try:
            model = keras.saving.load_model(model_file, compile=False)
        except Exception as e:
            raise ScriptError(
                f"--models entry {model_file}: cannot load the model "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]})")
        maps[name], spans[name] = {}, {}
        for method in methods:
            if method == "grad":
                m = attribution.input_gradient(model, x, y, batch_size=FLAGS.batch_size)
            else:
                m = attribution.integrated_gradients(model, x, y, steps=FLAGS.steps,
                                                     batch_size=FLAGS.batch_size)
            maps[name][method] = m
            spans[name][method] = {s: attribution.attribution_span(m, s) for s in SHARES}
            rows.append({"model": name, "path": model_file, "method": method,
                         **{f"span{int(s * 100)}": float(spans[name][method][s].mean())
                            for s in SHARES}})

    out = FLAGS.out
    os.makedirs(out, exist_ok=True)
    pngs = plot(x, maps, spans, names, methods, out)
    with open(os.path.join(out, "attribution_span.json"), "w") as f:
        json.dump({"dataset": FLAGS.dataset, "num_images": int(len(y)), "steps": FLAGS.steps,
                   "rows": rows}, f, indent=1)

    width = max(len("model"), *(len(r["model"]) for r in rows))
    print(f"attribution span on {len(y)} {FLAGS.dataset} test images (true-class logit; "
          f"fraction of pixels holding the share of |attribution|)")
    print(f"{'model':<{width}}  method  span@50%  span@90%")
    for r in rows:
        print(f"{r['model']:<{width}}  {r['method']:<6}  {r['span50']:8.4f}  {r['span90']:8.4f}")
    print(f"wrote {', '.join(pngs)}, {os.path.join(out, 'attribution_span.json')}")
    return rows


def main(argv):
    del argv
    run_or_exit(run)


if __name__ == "__main__":
    app.run(main)
