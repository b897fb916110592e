"""What `import again_tf` arranges without importing TensorFlow itself.

`import again_tf` is cheap (the command-line `--help` needs no TensorFlow); TensorFlow is
imported when something first needs it: an again_tf submodule, or the user's own
`import tensorflow` / `import keras`. At that moment `again_tf`:

- keeps TensorFlow's start-up noise off the terminal. On a CPU-only machine, loading the
  CUDA stubs prints "Could not find cuda drivers on your machine", "All log messages
  before absl::InitializeLog() is called are written to STDERR" and "failed call to
  cuInit: ... UNKNOWN ERROR (303)", from C++ before any logging is configured, so
  `TF_CPP_MIN_LOG_LEVEL` cannot hide them, and the last reads like a real error. The
  import and the first device query run with the process' stderr (file descriptor 2)
  sent to a temporary file; every other line is written back, so real warnings stay.
- turns on TensorFlow's oneDNN CPU kernels (`TF_ENABLE_ONEDNN_OPTS=1`, unless the
  environment already sets it), which TensorFlow enables by itself only on some Intel
  CPUs: the same training step runs about twice as fast on this project's AMD machines.
- registers its Keras classes (models, layers, defenses) as soon as Keras is imported, so
  `keras.saving.load_model("model.keras")` finds them after `import again_tf`.

Both happen through a finder on `sys.meta_path` that wraps the loaders of `tensorflow`,
`keras` and again_tf's own submodules (the usual post-import-hook pattern; the last only
to know when none of them is half-imported, so that registering cannot meet a circular
import). If TensorFlow was imported before again_tf, only the registration happens.
"""

import importlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
import threading

# Start-up lines of TensorFlow's CUDA stubs and CPU feature check, harmless without a GPU.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|Could not find cuda drivers"
    r"|failed call to cuInit"
    r"|cpu_feature_guard\.cc"
    r"|^To enable the following instructions:.*rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation_placer\.cc.*already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|oneDNN custom operations are on")  # we turn them on (below) and say so in the README

# The modules whose import registers every serializable again_tf class with Keras.
REGISTERING = ("again_tf.models", "again_tf.layers", "again_tf.defenses")

_lock = threading.RLock()
_registered = False
_depth = 0  # again_tf submodules being imported right now (registering waits for 0)


class _QuietStderr:
    """Sends file descriptor 2 to a temporary file; on exit writes back all but NOISE."""

    def __enter__(self):
        self.saved = None
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable stderr: do nothing
            return self
        self.file = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            return False
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        kept = [line for line in self.file.read().decode(errors="replace").splitlines()
                if line.strip() and not NOISE.search(line)]
        self.file.close()
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
        return False


def register_keras_classes():
    """Imports the modules that register again_tf's serializable Keras classes (once).

    Keras imported while an again_tf submodule is being imported (which imports Keras
    itself) defers this to the end of that import: the registering modules may be the
    ones half-way through their own import.
    """
    global _registered
    with _lock:
        if _registered or _depth or "keras" not in sys.modules:
            return
        _registered = True
        for name in REGISTERING:
            importlib.import_module(name)


class _WrappedLoader(importlib.abc.Loader):
    """The real loader of `tensorflow` or `keras`, with work before/after its import."""

    def __init__(self, loader, name):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        global _depth
        if self.name.startswith("again_tf."):
            with _lock:
                _depth += 1
            try:
                self.loader.exec_module(module)
            finally:
                with _lock:
                    _depth -= 1
            register_keras_classes()
        elif self.name == "tensorflow":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's INFO lines
            # oneDNN's CPU kernels: TensorFlow turns them on by itself only on some Intel
            # CPUs; elsewhere its convolutions are ~2x slower (README, speed against
            # PyTorch). An explicit TF_ENABLE_ONEDNN_OPTS=0 is respected.
            os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
            with _QuietStderr():
                self.loader.exec_module(module)
                # CUDA's initialization prints at the first device query.
                module.config.list_physical_devices("GPU")
        else:
            self.loader.exec_module(module)
            register_keras_classes()

    def __getattr__(self, attr):  # resource readers, is_package, ...: the real loader's
        return getattr(self.loader, attr)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of `tensorflow`, `keras` and again_tf's submodules (module doc)."""

    def find_spec(self, fullname, path=None, target=None):
        ours = fullname.startswith("again_tf.")
        if (fullname not in ("tensorflow", "keras") and not ours) or fullname in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _WrappedLoader(spec.loader, fullname)
        return spec


def install():
    """Arranges the quiet TensorFlow import and the Keras registration (idempotent)."""
    if not any(isinstance(f, _AfterImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder())
    if "keras" in sys.modules:  # imported before again_tf: register right away
        register_keras_classes()


def import_tensorflow():
    """Imports TensorFlow now (quietly, if it is not imported yet)."""
    install()
    import tensorflow  # noqa: F401
