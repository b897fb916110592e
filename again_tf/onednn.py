"""A known fault of TensorFlow's oneDNN CPU kernels that training can run into, and its check.

again_tf turns oneDNN on (`again_tf.startup`). On CPUs without AVX-512, oneDNN's AVX2 kernel
for the weight gradient of a 1x1 convolution with stride > 1 and fewer than 8 input channels
writes past its workspace (oneDNN issue #6035, open; TensorFlow 2.21): the kernel gradient is
wrong (relative error ~0.5-0.9 measured here with `ONEDNN_MAX_CPU_ISA=AVX2`), and with one
intra-op thread the process aborts on a corrupted heap. Forward passes and input gradients
(what attacks use) are right; stride-1 1x1 kernels are right.

again_tf's own networks compute strided 1x1 convolutions as a stride-1 convolution of the
subsampled input (`again_tf.models.StridedPointwiseConv2D`), which is not affected.
`AdversarialModel` warns (`check_model`) when a model it trains has such a layer of its own
on a CPU where oneDNN takes that code.
"""

import os
import warnings

import keras

# oneDNN's AVX-512 code (avx512_core) needs these; without any of them it takes AVX2 code.
AVX512_CORE = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
# ONEDNN_MAX_CPU_ISA values that keep oneDNN at AVX2 or below.
BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def takes_avx2_code(cpuinfo="/proc/cpuinfo"):
    """True when oneDNN is on and runs its AVX2 (or older) code on this CPU; False when it
    is off or the CPU has AVX-512; None when the CPU's flags cannot be read (not Linux)."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() in ("0", "false"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in BELOW_AVX512:
        return True
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return not all(flag in flags for flag in AVX512_CORE)
    except OSError:
        return None
    return None


def affected_layers(model):
    """Names of `model`'s built `Conv2D` layers with a 1x1 kernel, a stride > 1 and fewer
    than 8 input channels (oneDNN's block of AVX2 code is 8 channels wide)."""
    names = []
    for layer in model._flatten_layers(include_self=True):  # Keras offers no public walk
        if (isinstance(layer, keras.layers.Conv2D) and layer.built
                and tuple(layer.kernel_size) == (1, 1) and max(layer.strides) > 1
                and layer.kernel.shape[2] < 8):
            names.append(layer.name)
    return names


def check_model(model, cpuinfo="/proc/cpuinfo"):
    """Warns once per call if training `model` here would take oneDNN's faulty gradient."""
    names = affected_layers(model)
    if names and takes_avx2_code(cpuinfo):
        warnings.warn(
            f"{', '.join(names)}: 1x1 convolution(s) with stride > 1 on fewer than 8 channels; "
            f"on this CPU (no AVX-512) TensorFlow's oneDNN kernels compute their weight "
            f"gradients wrongly (oneDNN issue #6035). Use "
            f"again_tf.models.StridedPointwiseConv2D instead, or set TF_ENABLE_ONEDNN_OPTS=0 "
            f"before TensorFlow is imported", stacklevel=3)
    return names
