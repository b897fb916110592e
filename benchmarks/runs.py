"""A run's saved configuration (its run.json) against the one a benchmark script asks for.

The scripts reuse finished runs and rebuild tables from them; a run trained with other
settings must not be reused or tabulated silently.
"""

import dataclasses
import json

# run.json keys that depend on the machine or the invocation, not on what is trained.
NOT_CONFIGURATION = ("out_dir", "resume", "verbose", "jit_compile", "data_dir")


def config_differences(saved, cfg, ignore=()):
    """[(key, saved value, value of `cfg`)] where the saved configuration `saved` (a run.json
    as loaded) differs from what the `training.TrainConfig` `cfg` would train, leaving out
    NOT_CONFIGURATION and `ignore`."""
    from again_tf import training

    mine = json.loads(json.dumps(dataclasses.asdict(training.resolve(cfg)[0]), default=list))
    keys = set(saved) & set(mine) - set(NOT_CONFIGURATION) - set(ignore)
    return [(k, saved[k], mine[k]) for k in sorted(keys) if saved[k] != mine[k]]
