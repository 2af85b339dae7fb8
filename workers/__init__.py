# The engine's OpenMP wait default must be in the environment before torch loads libgomp: this package is
# imported before any of its modules import torch (workers/threads.py says what and why).
from workers.threads import apply_omp_defaults as _apply_omp_defaults

_apply_omp_defaults()
