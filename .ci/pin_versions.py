"""Prints `name==version` for again_tf's installed dependencies (with the `test` extra),
recursively: the body of constraints.txt. Run after the suite passed with new versions:

    python .ci/pin_versions.py > constraints.txt
"""

import importlib.metadata as metadata
import re

from packaging.markers import default_environment
from packaging.requirements import Requirement

HEADER = """\
# The versions the test suite passed with (CPU, Python 3.11): the README's install and CI
# use this file. setup.py keeps the ranges a user may widen at their own risk.
# Regenerate after an upgrade that the suite passed: python .ci/pin_versions.py > constraints.txt"""


def key(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def applies(req, extras):
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("",) + tuple(extras))


def closure(root, extras):
    """{normalized name: (name, version)} of `root` and everything it requires."""
    found = {}

    def walk(name, extras):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # an optional dependency not installed
            return
        found.setdefault(key(name), (dist.metadata["Name"], dist.version))
        for text in dist.requires or []:
            req = Requirement(text)
            if applies(req, extras) and (key(req.name) not in found or req.extras):
                walk(req.name, tuple(req.extras))

    walk(root, extras)
    found.pop(key(root), None)
    return found


if __name__ == "__main__":
    print(HEADER)
    for name, version in sorted(closure("again_tf", ("test",)).values(), key=lambda t: key(t[0])):
        print(f"{name}=={version}")
