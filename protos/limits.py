"""Message-size limits every potluck channel and server uses, so both ends of the wire agree."""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 << 20  # gRPC send/receive limit; larger tensors are chunked below it
CHUNK_BYTES = 16 << 20  # tensors larger than this are split by rows into several messages
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
