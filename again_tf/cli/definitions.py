"""The command-line flags of train.py and evaluate.py, defined once.

Paper recipes are absl flagfiles in the repository's flags/ folder:
`python train.py --flagfile=flags/X.cfg`.
Numbers that are fractions of 255 may be written as such: `--eps=8/255`.
"""

from absl import flags

from again_tf import catalog


def fraction(text, flag):
    """Parses `0.031`, `8/255` or an empty value (None); a clear error otherwise."""
    if text in (None, ""):
        return None
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--{flag}={text!r} is not a number or a fraction such as 8/255") from None


def integers(items, flag):
    """Parses a list flag of integers (`--lr_milestones=100,150`); a clear error otherwise."""
    try:
        return tuple(int(str(item).strip()) for item in items)
    except ValueError:
        raise ValueError(f"--{flag}={','.join(map(str, items))}: expected integers separated "
                         f"by commas, e.g. 100,150") from None


def key_values(text, flag):
    """Parses `beta=6,gamma=0.005` into {"beta": 6.0, "gamma": 0.005}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--{flag}: expected name=value pairs separated by commas, got {item!r}")
        try:
            out[key.strip()] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def define_common():
    flags.DEFINE_string("dataset", "fashion_mnist", f"Dataset: {', '.join(catalog.DATASETS)}.")
    flags.DEFINE_string("data_dir", None, "Folder with the dataset's standard files (idx.gz, "
                        "CIFAR binary/python tarball or folder, SVHN .mat) or a prepared "
                        "tensorflow-datasets copy. Default: Debian's Fashion-MNIST, then tfds.")
    flags.DEFINE_string("eps", None, "L-inf (or L2) radius in [0, 1] pixel units; fractions "
                        "allowed (8/255). Default: the dataset's usual value (0.1 Fashion-MNIST, "
                        "0.3 MNIST, 8/255 CIFAR/SVHN).")
    flags.DEFINE_string("step_size", None, "PGD step in pixel units (fractions allowed). "
                        "Default eps/4.")
    flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model.")
    flags.DEFINE_integer("batch_size", 128, "Batch size.")
    flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling, attack starts).")
    flags.DEFINE_string("jit_compile", "auto", "XLA: true, false, or auto (on only when a GPU "
                        "is visible; on CPU it was slower here).")


def define_train():
    define_common()
    flags.DEFINE_string("defense", "again_pgd", f"Defense: {', '.join(catalog.DEFENSES)}.")
    flags.DEFINE_string("defense_params", "", "Defense hyper-parameters as name=value pairs, "
                        "e.g. beta=6.")
    flags.DEFINE_string("memorization_scores", None, "Per-example memorization scores of the "
                        "training split (.npy, or .npz with a tr_mem entry) for --defense=bat; "
                        "see benchmarks/memorization.py.")
    flags.DEFINE_string("model", "auto", f"Model: auto (preact_resnet18; width 8 for 28x28 "
                        f"data) or one of {', '.join(catalog.MODELS)}.")
    flags.DEFINE_integer("width", 0, "Channels of the first stage of small_cnn, resnet18, "
                         "preact_resnet18 (0: the model's default: 16 for small_cnn, 64 for "
                         "the ResNets, the papers' width; 8 for --model=auto on 28x28 data).")
    flags.DEFINE_integer("epochs", 3, "Epochs.")
    flags.DEFINE_enum("optimizer", "adam", ["sgd", "adam"], "Optimizer.")
    flags.DEFINE_float("lr", 1e-3, "Learning rate.")
    flags.DEFINE_enum("lr_schedule", "constant", ["constant", "piecewise", "cosine"],
                      "piecewise: multiply by --lr_decay at each of --lr_milestones.")
    flags.DEFINE_list("lr_milestones", [], "Epochs at which the piecewise schedule decays.")
    flags.DEFINE_float("lr_decay", 0.1, "Piecewise decay factor.")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
    flags.DEFINE_float("weight_decay", 0.0, "Coupled L2 weight decay (torch SGD style), e.g. 5e-4.")
    flags.DEFINE_integer("attack_steps", 10, "PGD steps of the training attack.")
    flags.DEFINE_bool("attack_training", False, "Craft the training attack with BatchNorm in "
                      "training mode (batch statistics), as the AWP repository's "
                      "AT_AWP/train_cifar10.py (PGD-AT, AT-AWP) does; default inference mode, "
                      "as the TRADES, MART, TRADES-AWP, CAS, CIFS and AGAIN code. The "
                      "attack leaves the running statistics as they were unless "
                      "--attack_updates_statistics.")
    flags.DEFINE_bool("attack_updates_statistics", False, "With --attack_training: every "
                      "attack iterate's forward pass updates the BatchNorm running "
                      "statistics, as the official train-mode attack (AT_AWP/train_cifar10.py) "
                      "does.")
    flags.DEFINE_integer("eval_steps", 10, "PGD steps of the per-epoch validation attack.")
    flags.DEFINE_integer("val_size", None, "Training examples held out for validation "
                         "(selects best.keras); 0: no validation. Default: 500 for 28x28 "
                         "data, 1000 otherwise.")
    flags.DEFINE_integer("train_size", None, "Use only the first N training examples (0: "
                         "all). Default: 10000 for 28x28 data (the 10-minute CPU run), all "
                         "otherwise.")
    flags.DEFINE_integer("test_images", 1000, "Test images of the final table.")
    flags.DEFINE_list("test_attacks", ["clean", "pgd20"], "Attacks of the final table.")
    flags.DEFINE_string("out_dir", None, "Run folder. Default runs/<dataset>_<model>_<defense>.")
    flags.DEFINE_bool("resume", False, "Continue the run in --out_dir from its last finished "
                      "epoch (the result equals an uninterrupted run's). A changed --lr, "
                      "--momentum or schedule setting applies from the next epoch and is "
                      "printed; another --optimizer is refused.")
    flags.DEFINE_integer("verbose", 1, "0 silent, 1 progress bar, 2 one line per epoch.")
    define_scale()


def define_scale():
    """Distribution and mixed-precision flags (train.py, tune.py)."""
    flags.DEFINE_enum("strategy", "none", ["none", "mirrored", "multi_worker"],
                      "Distribution: none (one device), mirrored (all local GPUs, or "
                      "--cpu_replicas logical CPUs), multi_worker (one process per machine, "
                      "cluster in the TF_CONFIG environment variable). --batch_size is global.")
    flags.DEFINE_integer("cpu_replicas", 0, "With --strategy=mirrored and no GPU, split the "
                         "CPU into N logical devices (N >= 2): tests distribution on a CPU; "
                         "not faster. 0: off.")
    flags.DEFINE_bool("sync_batchnorm", False, "Synchronized BatchNorm: batch statistics "
                      "all-reduced over the replicas (default: each replica's own).")
    flags.DEFINE_enum("mixed_precision", "off", ["off", "float16", "bfloat16"],
                      "Mixed precision: float16 (mixed_float16 with loss scaling; GPUs with "
                      "tensor cores), bfloat16 (TPUs, recent CPUs/GPUs), off (float32).")


def define_evaluate():
    define_common()
    flags.DEFINE_string("model_path", None, "A .keras file, or a run folder of train.py "
                        "(its model.keras; --checkpoint=best for best.keras).")
    flags.DEFINE_enum("checkpoint", "final", ["final", "best"], "Which model of a run folder.")
    flags.DEFINE_list("attacks", ["clean", "pgd10", "pgd20", "cw"], "Attacks: clean, fgsm, "
                      "pgdK (e.g. pgd20), cw or cwK (C&W-inf), temp_pgd or "
                      "temp_pgdK (Temperature-PGD; old alias tpgd), aa (AutoAttack standard), aa_plus, aa_rand, "
                      "apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square, cwl2 (C&W-L2).")
    flags.DEFINE_integer("num_images", 1000, "Evaluate on the first N test images (0: all).")
    flags.DEFINE_string("report", None, "JSON report path; the Markdown table and the PNG "
                        "plots are written beside it. Default: <model folder>/eval.json "
                        "(eval_<name>.json for a model file not named model.keras).")
    for name, default in catalog.ATTACK_OPTIONS.items():
        define = flags.DEFINE_float if isinstance(default, float) else flags.DEFINE_integer
        define(name, default, catalog.ATTACK_OPTION_HELP[name])
    flags.DEFINE_string("loss", "adaptive", "Attack objective of the gradient attacks "
                        "(fgsm, pgdK, cw, temp_pgd, apgd-ce, apgd-dlr): main (each attack's own "
                        "loss on the main logits), combined (main + beta*mean over the "
                        "auxiliary heads of the same loss, beta the model's trained "
                        "aux_weight, default 2), aux (the auxiliary heads alone), "
                        "main_relaxed and combined_relaxed (through the masks' argmax "
                        "choice), or adaptive: for a model with auxiliary heads (ASE "
                        "again_*, CAS, CIFS) each attack runs on all five and an image is "
                        "robust only if it survives all (aa: APGD-CE on the others follows "
                        "AutoAttack on the points still robust); the table lists each loss's "
                        "accuracy. For other models adaptive is main. Registered in "
                        "again_tf.evaluation.OBJECTIVES.")
    flags.DEFINE_bool("classwise", True, "Write the class-wise report (JSON + PNG plots).")
    flags.DEFINE_bool("sanity", False, "Run the gradient-masking sanity checks "
                      "(Carlini et al. 2019) and flag failures in the report.")
    flags.DEFINE_integer("sanity_images", 200, "Images of the sanity checks (the first N "
                         "evaluated; 0: all).")
    flags.DEFINE_string("surrogate_path", None, "A .keras model to transfer attacks from in "
                        "the sanity checks. Default: the model without its inserted layers "
                        "(when it has any), else the transfer check is skipped.")
    flags.DEFINE_string("memorization_scores", None, "Per-example memorization scores (.npy, "
                        "or .npz with a tr_mem entry) of --memorization_split, for "
                        "--split_by_memorization.")
    flags.DEFINE_bool("split_by_memorization", False, "Also report clean and robust accuracy "
                      "on the typical (mem <= t) and atypical (mem > t) examples of the first "
                      "--num_images of --memorization_split.")
    flags.DEFINE_enum("memorization_split", "train", ["train", "test"], "The split the "
                      "scores index (Feldman & Zhang's tr_mem: train).")
    flags.DEFINE_float("memorization_threshold", 0.15, "t between typical and atypical "
                       "(the BAT paper's 0.15).")
    flags.DEFINE_integer("verbose", 1, "0 quiet, 1 progress bars.")
