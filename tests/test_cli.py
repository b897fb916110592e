"""The command-line contract that needs no training: fast help, quiet start, one catalog."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from again_tf import catalog, data, evaluation, models
from again_tf.defenses import registry
from helpers import ROOT


def run(args, env_update=None, **kwargs):
    # The settings again_tf makes when it imports TensorFlow (this process did) are not
    # inherited: each subprocess starts as a user's would.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**env, **(env_update or {})}, **kwargs)


@pytest.mark.parametrize("script, own", [
    ("train.py", ["--defense", "--epochs", "--train_size", "--width", "--attack_training",
                  "--resume", "--dataset", "--eps", "--seed"]),
    ("evaluate.py", ["--model_path", "--attacks", "--loss", "--num_images", "--dataset",
                     "--eps", "--seed"]),
    ("tune.py", ["--defense", "--tuner", "--max_trials", "--dataset", "--eps", "--batch_size",
                 "--seed"]),
])
def test_help_lists_the_scripts_flags_fast_with_exit_0(script, own):
    # -X importtime lists every module imported on stderr: TensorFlow (~10-20 s to import
    # here) must not be one of them. Checked by name, not by a timer the load can break.
    proc = run(["-X", "importtime", script, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "again_tf" in imported and "absl.flags" in imported, proc.stderr[-2000:]
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "keras")]
    listed = {"--" + f for f in re.findall(r"^  --(?:\[no\])?(\w+)", proc.stdout, flags=re.M)}
    assert set(own) <= listed, set(own) - listed
    assert "--logtostderr" not in listed  # absl's own flags only with --helpfull
    assert "tensorflow" not in proc.stderr.lower()
    full = run([script, "--helpfull"])
    assert full.returncode == 0
    assert full.stdout.index("--defense" if script != "evaluate.py" else "--model_path") < \
        full.stdout.index("logtostderr")


def test_import_is_light_quiet_and_registers_the_keras_classes(tmp_path):
    """`import again_tf` imports no TensorFlow; a later `import keras` is quiet and can
    load again_tf's models; the CUDA start-up lines never reach the terminal."""
    code = textwrap.dedent(f"""
        import sys
        import again_tf
        assert "tensorflow" not in sys.modules, "import again_tf imported TensorFlow"
        from again_tf import models
        net = models.build("preact_resnet18", 10, width=2)
        net.build((None, 8, 8, 1))
        net.save({str(tmp_path / "m.keras")!r})
        import os
        print(os.environ["TF_ENABLE_ONEDNN_OPTS"])
    """)
    saved = run(["-c", code])
    assert saved.returncode == 0, saved.stderr[-2000:]
    # This process also checks that a user's TF_ENABLE_ONEDNN_OPTS=0 is kept.
    load = textwrap.dedent(f"""
        import os
        import again_tf, keras
        model = keras.saving.load_model({str(tmp_path / "m.keras")!r})
        print(type(model).__name__, model.width, os.environ["TF_ENABLE_ONEDNN_OPTS"])
    """)
    loaded = run(["-c", load], env_update={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["PreActResNet18", "2", "0"]
    for proc in (saved, loaded):
        for noise in ("cuda drivers", "cuInit", "absl::InitializeLog", "cpu_feature_guard",
                      "oneDNN custom operations"):
            assert noise not in proc.stderr, proc.stderr
    # TensorFlow's oneDNN kernels are on (about 2x faster convolutions on AMD CPUs) unless
    # the user says otherwise.
    assert saved.stdout.split() == ["1"]


def test_a_folder_named_again_tf_in_the_working_directory_does_not_shadow_it(tmp_path):
    # A clone's parent folder holds the clone, `again_tf/` without __init__.py: Python must
    # still import the installed package, not an empty namespace package.
    (tmp_path / "again_tf" / "again_tf").mkdir(parents=True)
    code = "import again_tf, again_tf.catalog; print(again_tf.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == os.path.join(ROOT, "again_tf", "__init__.py")


def test_the_catalog_is_what_the_modules_use():
    assert registry.names()[:len(catalog.DEFENSES)] == catalog.DEFENSES
    assert data.DATASETS == catalog.DATASETS and models.MODELS == catalog.MODELS
    assert evaluation.DEFAULT_OPTIONS == catalog.ATTACK_OPTIONS
