from setuptools import find_packages, setup

setup(
    name="again_tf",
    version="0.1.0",
    description="Adversarial training (AGAIN, CAS/CIFS, BAT, TRADES, MART, AWP, ...) and "
                "robustness evaluation for TensorFlow 2 / Keras 3",
    packages=find_packages(include=["again_tf", "again_tf.*"]),
    # The clone's root as the package root: `pip install -e .` then puts that folder on
    # sys.path (a static .pth) instead of an import hook, so a clone folder named again_tf
    # in the current directory (running from the clone's parent) cannot shadow the package
    # as an empty namespace package.
    package_dir={"": "."},
    python_requires=">=3.10",
    install_requires=[
        # Tested: the exact versions of constraints.txt (pip install -e . -c constraints.txt).
        "tensorflow>=2.16,<3",
        "keras>=3.0,<4",
        "tensorflow-datasets",
        "importlib_resources",  # tensorflow-datasets imports it when downloading
        "keras-tuner[bayesian]",  # [bayesian]: scikit-learn, for tune.py --tuner=bayesian
        "tensorboard",  # keras-tuner imports it for every trial under TensorFlow
        "absl-py",
        "matplotlib",
        "scipy",  # SVHN's .mat files
        "numpy",
    ],
    extras_require={
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist>=3.8"],  # 3.8: --no-loadscope-reorder
        # benchmarks/versus_pytorch.py. Pinned: on the project's machines pip takes this
        # release's CPU build from local disk (a newer torch is a multi-GB CUDA build).
        # torchattacks goes in separately with --no-deps (it declares torchvision and an
        # old requests, neither of which it imports): see the README.
        "compare": ["torch==2.13.0"],
    },
)
