"""What both ends of BlockTransfer's gRPC stream agree on: the method, chunk sizes, message caps, HTTP/2 tuning.

The serving side (``transfer_servicer``, ``transfer_server``) and the requesting side (``transfer_client``)
both import these, so neither imports the other. The raw block stream's own limits are in ``raw_frames``.
"""

from __future__ import annotations

from protos.prefixcache.v1 import cache_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BlockTransfer"].full_name
FETCH_METHOD = f"/{SERVICE_NAME}/FetchBlocks"
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 4 << 20
# Message caps for both ends: a chunk plus its token ids and framing.
TRANSFER_MESSAGE_BYTES = MAX_CHUNK_BYTES + (1 << 20)
# HTTP/2 tuning for both ends (measured with benchmarks/bench_cache.py, serving side in another process):
# the largest frame HTTP/2 allows, and a receive window that lets several 1 MiB messages be in flight.
HTTP2_MAX_FRAME_BYTES = (1 << 24) - 1
STREAM_WINDOW_BYTES = 8 << 20
