"""The command-line layer of train.py, evaluate.py and tune.py (no TensorFlow at import).

`definitions` defines the absl flags once; `help` prints a script's own flags first and
fast (`--help`, `--helpfull`), exit code 0. Paper recipes are absl flagfiles in the
repository's `flags/` folder: `python train.py --flagfile=flags/cifar10_resnet18_pgd_at.cfg`.
"""
