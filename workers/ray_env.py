"""What a worker asks the Ray runtime about itself; each answer has a plain default outside Ray (unit tests).

Also the one set of rules for "where does a listener bind, and what do others dial" (``bind_host``,
``advertise_host``): the stack's ``--host`` is applied to every listener of every worker with them.
"""

from __future__ import annotations

import ipaddress

# Bind addresses that mean "every interface": nobody can dial them, so a listener bound to one advertises
# its machine's IP instead.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


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


def is_wildcard(host: str) -> bool:
    return host in WILDCARD_HOSTS


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: not ours to classify


def bind_host(requested: str | None) -> str:
    """Where a worker binds its listeners, given the stack's ``--host``.

    Loopback and wildcard addresses mean the same on every machine, so they are used as given. Any other
    address names one machine's interface, which a worker on another machine cannot bind: there the worker
    binds the address its own Ray node registered with. None (no ``--host`` passed down): the node's IP."""
    if requested is not None and (is_wildcard(requested) or is_loopback(requested)):
        return requested
    return node_ip()


def advertise_host(bound: str) -> str:
    """What peers dial to reach a listener bound to ``bound``: the address itself, or this node's IP for a
    wildcard."""
    return node_ip() if is_wildcard(bound) else bound
