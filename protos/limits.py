"""Message-size limits and liveness settings every potluck channel and server uses, so both ends
of the wire agree."""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 << 20  # gRPC send/receive limit; larger tensors are chunked below it
CHUNK_BYTES = 16 << 20  # tensors larger than this are split by rows into several messages

# Keepalives: every channel pings its peer every 2 s and gives up on the connection when a ping
# goes 3 s unanswered, failing the calls on it (UNAVAILABLE). A process that is stopped (SIGSTOP, a
# laptop's lid closed) keeps its TCP connections open and would leave calls hanging until their
# deadlines; so it is found within about 5 s.
KEEPALIVE_TIME_MS = 2000
KEEPALIVE_TIMEOUT_MS = 3000

MAX_RECONNECT_BACKOFF_MS = 5000  # a returning agent is seen again within about this much plus a poll

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # no cap on pings between data frames
    # Reconnecting to an agent that went away: gRPC's default backoff grows to 120 s, so an agent
    # restarted after a minute's outage could wait two more before the server saw it again.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]
# A server must accept pings that often, or it answers them with GOAWAY (too_many_pings).
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
]


def peer_deadline_s(nbytes: int, work_s: float = 0.0) -> float:
    """The deadline of a call between agents: 10 s, plus its bytes at 1 MB/s (a link far slower
    than any LAN's), plus the work it asks for. A live but busy peer answers well within it; a
    peer that hangs is usually found sooner by the keepalives."""
    return 10.0 + nbytes / 1e6 + work_s
