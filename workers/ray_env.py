"""What a worker asks the Ray runtime about itself; each answer has a plain default outside Ray (unit tests)."""

from __future__ import annotations


def ray_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside Ray (unit tests)
        return ""


def was_restarted() -> bool:
    """Whether this actor is a restart (Ray re-ran its constructor after the process died)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # noqa: BLE001 - outside Ray (unit tests)
        return False


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"
