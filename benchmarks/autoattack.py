"""Throughput of the native-TF AutoAttack on the small CNN: images/s and s per 1,000 images.

    python benchmarks/autoattack.py                 # SmallCNN (width 32), 200 test images
    python benchmarks/autoattack.py --images=100 --width=8

The model is first adversarially trained for a moment (PGD-AT on a few thousand
Fashion-MNIST images), so that many points stay robust after APGD-CE and every component
really runs — on a normally trained model AutoAttack stops after APGD-CE and looks far
faster than it is on a real defense. Prints the time of each component, the robust
accuracy after it, the total throughput and the time per 1,000 images (linear
extrapolation; AutoAttack's cost grows with the number of points still robust).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import again_tf  # noqa: E402,F401  (before TensorFlow: again_tf.startup's settings)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from again_tf import data, models  # noqa: E402
from again_tf.attacks import AutoAttack  # noqa: E402
from again_tf.defenses import AdversarialModel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="test images attacked")
    p.add_argument("--batch_size", type=int, default=250, help="AutoAttack batch size")
    p.add_argument("--width", type=int, default=32, help="SmallCNN width (its default: 32)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius (Fashion-MNIST: 0.1)")
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--version", default="standard", choices=["standard", "plus", "rand"])
    p.add_argument("--n_iter", type=int, default=100, help="APGD/FAB iterations (AA: 100)")
    p.add_argument("--n_queries", type=int, default=5000, help="Square queries (AA: 5000)")
    p.add_argument("--train_images", type=int, default=2000, help="PGD-AT training images")
    p.add_argument("--train_epochs", type=int, default=1, help="PGD-AT epochs (0: untrained)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(0)
    info = data.info("fashion_mnist")
    model = models.SmallCNN(10, width=args.width, mean=info.mean, std=info.std)
    model.build((None, 28, 28, 1))
    if args.train_epochs:
        x, y = data.load_arrays("fashion_mnist", f"train[:{args.train_images}]")
        adv = AdversarialModel(model, defense="pgd_at", eps=args.eps, steps=5, eval_steps=0)
        adv.build((None, 28, 28, 1))
        adv.compile(optimizer=keras.optimizers.Adam(2e-3))
        start = time.time()
        adv.fit(x.astype(np.float32) / 255.0, y, epochs=args.train_epochs, batch_size=64,
                verbose=0)
        print(f"PGD-AT of SmallCNN(width={args.width}) on {args.train_images} images: "
              f"{time.time() - start:.1f} s")
    x, y = data.load_arrays("fashion_mnist", f"test[:{args.images}]")
    x = x.astype(np.float32) / 255.0
    attack = AutoAttack(model, args.eps, norm=args.norm, version=args.version,
                        n_iter=args.n_iter, n_queries=args.n_queries)
    start = time.time()
    result = attack.run(x, y, batch_size=args.batch_size)
    seconds = time.time() - start
    print(f"AutoAttack {args.version} ({args.norm}, eps={args.eps:g}) on {len(y)} images, "
          f"batch {args.batch_size}, {os.cpu_count()} CPU cores, "
          f"GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    print(f"  clean accuracy      {result['clean_accuracy']:.2%}")
    for name, acc in result["accuracy_after"].items():
        print(f"  after {name:<13} {acc:.2%}   {result['seconds'][name]:8.1f} s")
    print(f"  total               {seconds:.1f} s (compilation included)")
    print(f"throughput: {len(y) / seconds:.2f} images/s; "
          f"{1000 * seconds / len(y):.0f} s per 1,000 images")
    return result


if __name__ == "__main__":
    main()
