"""What the engine is started with (`potluck serve` and `up` fill it from their flags)."""

from __future__ import annotations

from dataclasses import dataclass

from protos.routing import ExpertSplit
from protos.security import Credentials
from scheduler.batching import BatchSettings
from scheduler.placer import PlacementSettings


@dataclass(frozen=True)
class EngineSettings:
    max_waiting: int = 64  # queued requests beyond which submit answers QueueFull (429)
    max_running: int = 4  # requests prefilling or decoding at once (continuous batching)
    prefill_chunk: int = 512  # prompt tokens per prefill step while other requests decode
    home_prefill_max: int = BatchSettings.home_prefill_max  # longer prompts are prefilled sequence-parallel
    poll_interval_s: float = 2.0  # how often agents' health and counters are refreshed
    call_timeout_s: float = 300.0  # deadline of one control call to an agent
    credentials: Credentials | None = None  # the server's TLS identity; None: plaintext (--insecure)
    placement: PlacementSettings = PlacementSettings()  # which experts each agent pins, and when re-planned
    expert_split: ExpertSplit = "auto"  # how a home runs experts it does not hold (published in the routing table)
    decode_prefetch: bool = True  # homes read ahead what their prompts chose most (published in the routing table)
    load_balance: bool = True  # homes split the experts scheduler/balance.py chooses (else as expert_split says)

    def __post_init__(self) -> None:
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        self.batch  # checks its bounds

    @property
    def batch(self) -> BatchSettings:
        return BatchSettings(self.max_running, self.prefill_chunk, self.home_prefill_max)
