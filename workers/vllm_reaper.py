"""Ends a vLLM worker's engine processes when its actor process dies without stopping them (SIGKILL, OOM).

vLLM runs its engine core (and, on CPU, its model worker) in processes of their own, and they outlive a
killed frontend: orphans holding the KV pool's memory and the model. Ray restarts a dead worker actor on
the same machine (``max_restarts``), so every kill would leak one engine. The actor therefore starts this
watchdog beside its engine:

    python -m workers.vllm_reaper ACTOR_PID

It notes the actor's descendants every ``interval_s`` while the actor lives; once the actor is gone it
sends SIGTERM, then SIGKILL, to those it noted (matched by PID *and* start time, so a recycled PID is never
hit), and exits. A clean ``shutdown`` stops the engine first, leaving it nothing to do.
"""

from __future__ import annotations

import os
import signal
import sys
import time

__all__ = ["main", "reap"]


def reap(noted: dict[int, float], grace_s: float = 3.0) -> None:
    import psutil

    procs = []
    for pid, started in noted.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started:
                procs.append(p)
                p.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def main(argv: list[str] | None = None, interval_s: float = 1.0) -> int:
    import psutil

    actor_pid = int((argv or sys.argv[1:])[0])
    me = os.getpid()
    try:
        actor = psutil.Process(actor_pid)
    except psutil.Error:
        return 0
    noted: dict[int, float] = {}
    while True:
        try:
            if not actor.is_running() or actor.status() == psutil.STATUS_ZOMBIE:
                break
            noted = {c.pid: c.create_time() for c in actor.children(recursive=True) if c.pid != me}
        except psutil.Error:
            break
        time.sleep(interval_s)
    reap(noted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
