"""What the benchmark scripts take from the Fashion-MNIST recipes under `flags/`.

A benchmark row is a registered defense, or a variant: a registered defense with fixed
extra hyper-parameters (`VARIANTS`). Its hyper-parameters are the `--defense_params` of
the defense's recipe, so a benchmark trains what `train.py --flagfile=...` trains.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# AGAIN's full method is ASE and HFF (the official code never calls HFF, so `again_pgd`
# leaves it off).
VARIANTS = {"again_pgd_hff": ("again_pgd", {"hff": 1})}


def base_defense(name):
    """(registered defense, its extra hyper-parameters) of a row name; ValueError if
    `name` is neither a registered defense nor a variant."""
    from again_tf.defenses import registry

    if name in VARIANTS:
        return VARIANTS[name]
    if name not in registry.names():
        raise ValueError(f"unknown {name!r}; expected registered names "
                         f"({', '.join(registry.names())}) or {', '.join(VARIANTS)}")
    return name, {}


def recipe_params(name):
    """The `--defense_params` of the row's Fashion-MNIST recipe, or {}.

    Reads `flags/fashion_mnist_<defense>.cfg`, else the older name
    `flags/fashion_mnist_cnn_<defense>.cfg`; a variant takes its base defense's recipe
    with its own parameters on top.
    """
    from again_tf.cli import definitions

    base, extra = base_defense(name)
    params = {}
    for recipe in (f"fashion_mnist_{base}.cfg", f"fashion_mnist_cnn_{base}.cfg"):
        path = os.path.join(ROOT, "flags", recipe)
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.startswith("--defense_params="):
                        params = definitions.key_values(line.strip().split("=", 1)[1],
                                                        "defense_params")
            break
    return {**params, **extra}


def memorization_file(dataset, train_size):
    """Where `benchmarks/memorization.py` writes the scores of `dataset`'s first `train_size`
    training images (0: all), relative to the repository: what BAT's rows read."""
    return os.path.join("benchmarks", f"{dataset}_memorization"
                        + (f"_{train_size}" if train_size else "") + ".npy")
