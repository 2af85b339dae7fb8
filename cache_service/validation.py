"""Edge validation for CacheService requests: limits and what a well-formed request is.

Everything is checked before anything touches Redis, so a rejected request
writes nothing. Each check raises ``InvalidRequest`` (a ``ValueError``) whose
message names the field and the problem; the servicer turns it into
INVALID_ARGUMENT. The one exception is a heartbeat's transfer counts: they are
clamped, not refused (``clamp_counter_delta``).
"""

from __future__ import annotations

import re
from typing import Sequence

from cache_service.block_hash import HASH_NBYTES

# Explicit limits (a request above them is rejected, not truncated).
MAX_ID_LEN = 128
MAX_ADDRESS_LEN = 256
MAX_MODEL_ID_LEN = 512
MAX_SALT_LEN = 1024
MAX_TENANT_LEN = 256
MAX_LOOKUP_BLOCKS = 16_384  # 262k tokens at block_size 16
MAX_EVENTS_PER_PUBLISH = 65_536
MAX_PIN_TOKENS = 131_072
MAX_PIN_BLOCKS = 16_384
MAX_REPLICAS = 64
MAX_HEARTBEAT_TTL_S = 3_600
DEFAULT_HEARTBEAT_TTL_S = 10
MAX_PIN_TTL_S = 30 * 24 * 3_600
MAX_BLOCK_SIZE = 4_096
MAX_TOKEN_ID = 2**32 - 1
# What one heartbeat may add to a transfer counter: 256 TiB, far more than any link moves between two
# heartbeats. The index's counters themselves saturate at 2^62 (lua_scripts).
MAX_COUNTER_DELTA = 2**48
# gRPC message cap for the control plane: a full snapshot of MAX_EVENTS_PER_PUBLISH events fits.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$")
_ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


class InvalidRequest(ValueError):
    """A request field is malformed or over a limit."""


def check_id(value: str, field: str) -> str:
    if not value:
        raise InvalidRequest(f"{field} is required (got an empty string)")
    if len(value) > MAX_ID_LEN:
        raise InvalidRequest(f"{field} is {len(value)} characters long; the limit is {MAX_ID_LEN}")
    if not _ID_RE.match(value):
        raise InvalidRequest(
            f"{field} {value!r} has characters outside [A-Za-z0-9._:@/+=-] or does not start with a letter/digit"
        )
    return value


def check_address(value: str, field: str = "transfer_address") -> str:
    if not value:
        return value  # a node that serves no transfers
    if len(value) > MAX_ADDRESS_LEN or not (m := _ADDRESS_RE.match(value)) or not 0 < int(m.group(2)) < 65536:
        raise InvalidRequest(f"{field} {value[:80]!r} is not host:port")
    return value


def check_text(value: str, field: str, max_len: int, *, required: bool = False) -> str:
    if required and not value:
        raise InvalidRequest(f"{field} is required (got an empty string)")
    if len(value) > max_len:
        raise InvalidRequest(f"{field} is {len(value)} characters long; the limit is {max_len}")
    return value


def check_hashes(hashes: Sequence[bytes], field: str, max_count: int) -> list[bytes]:
    if len(hashes) > max_count:
        raise InvalidRequest(f"{field} has {len(hashes)} hashes; the limit is {max_count} per request")
    for i, h in enumerate(hashes):
        if len(h) != HASH_NBYTES:
            raise InvalidRequest(f"{field}[{i}] is {len(h)} bytes; a block hash is {HASH_NBYTES} bytes")
    return list(hashes)


def check_range(value: int, field: str, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise InvalidRequest(f"{field} = {value} is out of range [{lo}, {hi}]")
    return value


def check_tokens(tokens: Sequence[int], field: str, max_count: int) -> list[int]:
    if not tokens:
        raise InvalidRequest(f"{field} is required (got no tokens)")
    if len(tokens) > max_count:
        raise InvalidRequest(f"{field} has {len(tokens)} tokens; the limit is {max_count}")
    return list(tokens)


def check_tenant(value: str, field: str = "tenant") -> str:
    """A pin's owner; "" is the default tenant (callers from before pins had owners)."""
    check_text(value, field, MAX_TENANT_LEN)
    if "\x1f" in value:  # the separator of router/auth.tenant_salt: no tenant name holds it
        raise InvalidRequest(f"{field} holds a unit separator (\\x1f), which no tenant name can")
    return value


def clamp_counter_delta(value: int) -> int:
    """A heartbeat's transfer count, at most ``MAX_COUNTER_DELTA``.

    Clamped, not refused: a node keeps counts that were not delivered and sends them again, so refusing
    one absurd count would fail every later heartbeat of that node, and with them its liveness and pins,
    for what is only a statistic."""
    return min(int(value), MAX_COUNTER_DELTA)
