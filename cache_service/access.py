"""Who may call what on the internal planes: the authorization table of DESIGN 6b's members.

    CacheService  RegisterNode Heartbeat PublishEvents   the node itself: node_id must be the caller's identity
                  Lookup                                 nodes and the router
                  Pin Unpin GetStats                     the router and operators
    BlockTransfer FetchBlocks (gRPC and raw stream)      nodes, receiving for themselves (requester = caller)

The caller is what the credential proved (``common/member_interceptor.current_caller()`` on gRPC, the raw
stream's handshake on its own connection); ``None`` means the server runs without a credential (a library
default kept for tests and single-process use), and then everything is allowed as before. A refusal raises
``PermissionDenied``, before anything is read or written, and says which identity may.
"""

from __future__ import annotations

from common.cluster_auth import OPERATOR_IDENTITY, ROUTER_IDENTITY, Caller, PermissionDenied


def check_node(caller: Caller | None, node_id: str, method: str) -> None:
    """A node's own calls: its registration, heartbeats and block events, under its own id only."""
    if caller is not None and not (caller.is_node and caller.acts_as(node_id)):
        raise PermissionDenied(f"{caller} may not call {method} for node {node_id[:128]!r}: a node calls it "
                               f"only for itself")


def check_lookup(caller: Caller | None) -> None:
    if caller is not None and not (caller.is_node or caller.acts_as(ROUTER_IDENTITY)):
        raise PermissionDenied(f"{caller} may not call Lookup: nodes and the router may")


def check_router_or_operator(caller: Caller | None, method: str) -> None:
    if caller is not None and not (caller.acts_as(ROUTER_IDENTITY) or caller.acts_as(OPERATOR_IDENTITY)):
        raise PermissionDenied(f"{caller} may not call {method}: the router and operators may")


def is_operator(caller: Caller | None) -> bool:
    return caller is not None and caller.acts_as(OPERATOR_IDENTITY)


def check_fetch(caller: Caller | None, requester: str) -> None:
    """FetchBlocks: KV bytes and the prompt's token ids go only to a node, and only for itself."""
    if caller is None:
        return
    if not caller.is_node:
        raise PermissionDenied(f"{caller} may not fetch blocks: only nodes may")
    if requester and not caller.acts_as(requester):
        raise PermissionDenied(f"{caller} may not fetch blocks for {requester[:128]!r}: only for itself")
