"""Named failures of the scheduler. The server maps each to one OpenAI-shaped HTTP error."""

from __future__ import annotations


class PotluckError(Exception):
    """Base of every error potluck raises on purpose."""


class QueueFull(PotluckError):
    """The request queue is at its bound; the client should retry later (HTTP 429)."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"the request queue is full ({waiting} waiting); retry in {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class NoAgentsAvailable(PotluckError):
    """No node agent is reachable, so nothing can run (HTTP 503)."""


class PromptTooLong(PotluckError):
    """Prompt plus requested tokens exceed the model's context (HTTP 400)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(
            f"this model's maximum context length is {context} tokens, but the request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} more"
        )
        self.prompt_tokens = prompt_tokens
        self.context = context


class AgentFailed(PotluckError):
    """An agent failed mid-request; the request is aborted and its state released (HTTP 503).

    The message starts with the agent that failed, which is not always the one the scheduler
    called: an agent whose call to a peer failed reports that peer."""

    def __init__(self, message: str, agent: str | None = None, address: str | None = None, code: str = "UNAVAILABLE"
                 ) -> None:
        super().__init__(message)
        self.agent = agent  # NodeId of the agent that failed (None: unknown)
        self.address = address  # its gRPC address, as the agent that saw it fail reached it
        self.code = code  # the gRPC status code's name

    @property
    def down(self) -> bool:
        """The agent is gone or hangs (unreachable, shutting down and cancelling its calls, or no
        answer in time), rather than refusing this request (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
        ...): its requests go elsewhere."""
        return self.agent is not None and self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


class JoinRefused(PotluckError):
    """An agent answers but is not the one the inventory names, or serves another checkpoint than
    the scheduler's: refused at join, the message giving both values and the fix."""


def why_unable(exc: BaseException) -> str:
    """One short line on why an agent cannot serve: its refusal, or what the transport said."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not isinstance(exc, AgentFailed):
        return text
    why = text.partition(": ")[2] or text  # "agent X (addr) failed during Info: UNAVAILABLE: ..." -> the reason
    if why.startswith("UNAVAILABLE") and "Failed to connect to remote host: " in why:
        return f"unreachable ({why.rpartition('Failed to connect to remote host: ')[2].strip().lower()})"
    if why.startswith("DEADLINE_EXCEEDED"):
        return "no answer in time (stopped, overloaded, or not a potluck agent)"
    return why
