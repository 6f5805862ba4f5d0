"""trainer: a command-line training and experiment runner built on PyTorch."""

__version__ = "0.1.0"

import time as _time

PROCESS_STARTED = _time.perf_counter()  # the command's start: summary.json's wall_time_s counts from here


def __getattr__(name: str):  # `from trainer import register_model` in a plugin, without torch in `import trainer`
    if name == "register_model":
        from trainer.models import MODELS

        return MODELS.register
    if name == "register_dataset":
        from trainer.data import DATASETS

        return DATASETS.register
    raise AttributeError(f"module 'trainer' has no attribute '{name}'")
