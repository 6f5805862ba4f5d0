"""trainer: a command-line training and experiment runner built on PyTorch."""

__version__ = "0.1.0"

import time as _time

PROCESS_STARTED = _time.perf_counter()  # the command's start: summary.json's wall_time_s counts from here
