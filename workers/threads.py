"""The engine's CPU threading defaults, applied before torch is imported (``workers/__init__.py``).

Threads: torch's default intra-op count is the CPUs this process may run on (libgomp reads the affinity
mask); the stack pins one torch thread per CPU it gives a worker (``WorkerConfig.torch_threads``). Both are
kept: a worker computes on the cores it holds and no more.

Waiting: how an OpenMP worker thread waits between parallel regions. libgomp's default spins ~300,000
iterations before sleeping, which is best on an idle machine and ruinous on a busy one: a spinning thread
burns the time slice the thread it waits for needs. Measured on this project's shared 2-core machine, two
threads, bench_vs_vllm's quick workloads (shared-prefix total / cached TTFT):

    load average   libgomp default   GOMP_SPINCOUNT=3000   OMP_WAIT_POLICY=PASSIVE   1 thread
    ~1             0.23 s / 10.8 ms  0.25 s / 11.8 ms      0.40 s / 25.8 ms          0.35 s / 14.1 ms
    ~6-9           6.1 s / 122 ms    (10,000: 1.5 s / 94 ms) 0.62 s / 28 ms

so the default here is a short spin (3000 iterations, a few microseconds: a region that follows at once
still finds its threads awake) and then sleep. Set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` to choose
otherwise; either one set means this module leaves both alone.
"""

from __future__ import annotations

import os
import sys

DEFAULT_SPINCOUNT = "3000"


def apply_omp_defaults() -> bool:
    """Set the engine's OpenMP wait default unless the user chose one; True when it can still take effect
    (libgomp reads its environment once, when torch loads it)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = DEFAULT_SPINCOUNT
    return "torch" not in sys.modules


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
