"""Conv2D outputs and gradients of this TensorFlow build against NumPy, shape by shape.

    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/onednn_conv_gradients.py

The shapes are those of the networks' stems, blocks and shortcuts (3x3 at stride 1 and 2,
1x1 at stride 2 and 1) on 1 to 256 input channels, batch 8, each in eager mode and in a
compiled `tf.function`. `ONEDNN_MAX_CPU_ISA=AVX2` holds oneDNN to the code a CPU without
AVX-512 runs, where the weight gradient of a strided 1x1 convolution on fewer than 8 channels
is wrong (oneDNN issue #6035; see again_tf.onednn). Prints every case whose output, filter
gradient or input gradient is off by more than 1e-4 of its largest entry, then the count.
The loss is `sum(conv(x, k)**2)`; the reference is a float64 NumPy computation.
"""

import argparse
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import again_tf  # noqa: E402,F401  (turns oneDNN on before TensorFlow loads, as training does)

SIZES = [(28, 1), (28, 4), (28, 8), (14, 8), (14, 16), (7, 16), (7, 32), (32, 3), (32, 16),
         (32, 64), (16, 128), (8, 256)]
KERNELS = [(1, 2), (3, 2), (3, 1), (1, 1)]  # (kernel size, stride)


def padding(size, out, kernel, stride):
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def numpy_conv(x, k, stride, out):
    """Output, and the gradients of sum(output**2) w.r.t. the kernel and the input."""
    n, h, w, _ = x.shape
    size = k.shape[0]
    (top, bottom), (left, right) = padding(h, out, size, stride), padding(w, out, size, stride)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    window = lambda a, b: xp[:, a:a + stride * out:stride, b:b + stride * out:stride]  # noqa: E731
    y = sum(np.einsum("nijc,co->nijo", window(a, b), k[a, b])
            for a in range(size) for b in range(size))
    dy = 2 * y
    dk, dxp = np.zeros(k.shape), np.zeros(xp.shape)
    for a in range(size):
        for b in range(size):
            dk[a, b] = np.einsum("nijc,nijo->co", window(a, b), dy)
            dxp[:, a:a + stride * out:stride, b:b + stride * out:stride] += np.einsum(
                "nijo,co->nijc", dy, k[a, b])
    return y, dk, dxp[:, top:top + h, left:left + w]


def check(modes, seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    wrong = total = 0
    for mode in modes:
        for size, channels in SIZES:
            for kernel, stride in KERNELS:
                out_channels = 2 * channels if stride > 1 else channels
                x = rng.normal(size=(8, size, size, channels)).astype(np.float32)
                k = rng.normal(size=(kernel, kernel, channels, out_channels)).astype(np.float32)

                def run(x, k):
                    with tf.GradientTape() as tape:
                        tape.watch([x, k])
                        y = tf.nn.conv2d(x, k, stride, "SAME")
                        loss = tf.reduce_sum(y * y)
                    return (y,) + tuple(tape.gradient(loss, [k, x]))

                fn = run if mode == "eager" else tf.function(run, reduce_retracing=True)
                got = [t.numpy() for t in fn(tf.constant(x), tf.constant(k))]
                want = numpy_conv(x.astype(np.float64), k.astype(np.float64), stride,
                                  got[0].shape[1])
                errors = [np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want)]
                total += 1
                if max(errors) > 1e-4:
                    wrong += 1
                    print(f"{mode}: {kernel}x{kernel} stride {stride}, {size}x{size}x{channels}"
                          f" -> {out_channels}: relative error output {errors[0]:.1e}, "
                          f"filter gradient {errors[1]:.1e}, input gradient {errors[2]:.1e}")
    print(f"{wrong} of {total} cases wrong (ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}, TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS')})")
    return wrong


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="eager,graph",
                        help="comma-separated: eager, graph (a tf.function)")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - {"eager", "graph"})
    if unknown or not args.modes:
        parser.error(f"--modes={','.join(args.modes)}: expected eager and/or graph")
    return args


def main(argv=None):
    args = parse_args(argv)
    check(args.modes)


if __name__ == "__main__":
    main()
