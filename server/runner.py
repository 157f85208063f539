"""Running the HTTP server: `serve_http` (agents elsewhere) and `run_up` (agents as children).

    serve_http(options, nodes)              # uvicorn until SIGINT/SIGTERM; 0 on a clean stop
    run_up(options, agents, nodes, 180.0)   # start agents, wait for SERVING, serve, stop them all

The engine is started before uvicorn binds its port, so that no agent to serve with is one
clean error (`NoAgentsAvailable`, naming each agent and why), and stopped after uvicorn's
shutdown; the app's lifespan only attaches it. While serving, a watchdog checks the child agents twice a
second: one that died is started again with backoff (`LocalAgents.revive`) while the server serves
on the others, replaying the requests it broke.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from protos.routing import ExpertSplit
from protos.security import Credentials
from scheduler.api import Engine
from scheduler.placer import PlacementSettings
from scheduler.policy import Policy
from scheduler.service import JoinHook
from scheduler.types import NodeSpec
from server.app import EngineOpener, ServerSettings, create_app
from server.launcher import AgentExited, LocalAgents

log = logging.getLogger("potluck.server")

WATCH_INTERVAL_S = 0.5  # how often `up` checks that its agent processes still run

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The
# scheduler works out routing tables and placements in worker threads, pure Python for up to
# seconds with a 48-layer, 128-expert model on 8 agents, beside the event loop that streams
# tokens: there, every wake-up of the loop came 5.4 ms late while a table was worked out, and
# 0.76 ms late with this (the table took 4% longer; 0.1 ms late with the loop alone).
GIL_SWITCH_S = 0.0005


@dataclass(frozen=True)
class ServerOptions:
    """Everything `serve` and `up` need to run the HTTP server."""

    model_dir: Path  # checkpoint folder (tokenizer, config, weights)
    host: str  # bind address of the HTTP server
    port: int  # TCP port of the HTTP server
    api_key: str | None  # Bearer key required on /v1/*; None = open
    served_model_name: str  # model id in /v1/models and in requests
    max_waiting: int  # queued requests before 429
    max_running: int  # requests prefilling or decoding at once
    policy: Policy  # prefill policy and ablations
    log_level: str  # "DEBUG" | "INFO" | ...
    prefill_chunk: int = 512  # prompt tokens per prefill step while other requests decode
    home_prefill_max: int = 1024  # longer prompts are prefilled sequence-parallel, shorter ones on their home
    max_body_bytes: int = 4 * 2**20  # larger request bodies get 413; 0 = no bound
    credentials: Credentials | None = None  # the server's TLS identity toward the agents; None = plaintext
    placement: PlacementSettings = PlacementSettings()  # which experts each agent pins; how often re-planned
    expert_split: ExpertSplit = "auto"  # how a home runs experts it does not hold (RoutingTable)
    decode_prefetch: bool = True  # homes read ahead what their prompts chose most (RoutingTable)
    load_balance: bool = True  # the scheduler chooses where each home runs what it lacks (RoutingTable.runs)


class Shutdown(BaseException):
    """SIGINT or SIGTERM asked `potluck up` to stop (a BaseException, like KeyboardInterrupt)."""


def engine_opener(options: ServerOptions, nodes: Sequence[NodeSpec], on_join: JoinHook | None = None) -> EngineOpener:
    @asynccontextmanager
    async def open_engine() -> AsyncIterator[Engine]:
        from scheduler.engine_settings import EngineSettings
        from scheduler.service import start_engine

        settings = EngineSettings(max_waiting=options.max_waiting, max_running=options.max_running,
                                  prefill_chunk=options.prefill_chunk, home_prefill_max=options.home_prefill_max,
                                  credentials=options.credentials, placement=options.placement,
                                  expert_split=options.expert_split, decode_prefetch=options.decode_prefetch,
                                  load_balance=options.load_balance)
        service = await start_engine(options.model_dir, nodes, settings, options.policy, on_join)
        try:
            yield service
        finally:
            await service.stop()

    return open_engine


@dataclass(frozen=True)
class Reload:
    """Where `serve` re-reads its inventory from, on SIGHUP or when the file changes."""

    path: Path  # the inventory file
    read: Callable[[], Sequence[NodeSpec]]  # its nodes now; InventoryError keeps the running ones


def serve_http(options: ServerOptions, nodes: Sequence[NodeSpec], agents: LocalAgents | None = None,
               on_join: JoinHook | None = None, reload: Reload | None = None) -> int:
    """Run the server until it is asked to stop; 0 when it stopped cleanly, 1 otherwise."""
    sys.setswitchinterval(GIL_SWITCH_S)
    settings = ServerSettings(options.model_dir, options.served_model_name, options.api_key, options.max_body_bytes)
    slot = _EngineSlot()
    app = create_app(settings, slot.attach)  # loads the tokenizer: a broken one fails before any agent call
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level.lower(),
                            lifespan="on", timeout_graceful_shutdown=5, log_config=None)  # fmt: skip
    server = uvicorn.Server(config)
    with _signals_raise_shutdown():
        try:
            code = asyncio.run(_serve_watching(server, agents, slot, engine_opener(options, nodes, on_join), options,
                                                     len(nodes), reload))  # fmt: skip
        except Shutdown:
            return 0  # uvicorn has shut down gracefully (engine stopped) before re-raising
    return code


class _EngineSlot:
    """The engine started before uvicorn, handed to the app's lifespan."""

    engine: Engine | None = None

    @asynccontextmanager
    async def attach(self) -> AsyncIterator[Engine]:
        assert self.engine is not None, "the engine starts before the app"
        yield self.engine


async def _serve_watching(server: uvicorn.Server, agents: LocalAgents | None, slot: _EngineSlot,
                          open_engine: EngineOpener, options: ServerOptions, nodes: int,
                          reload: Reload | None = None) -> int:
    """Start the engine, then serve until asked to stop; the exit code. With `agents`, a child
    that dies is restarted. With `reload`, SIGHUP or a change of the file's modification time
    re-reads the inventory."""
    async with open_engine() as slot.engine:
        log.info("starting the API for %s on http://%s:%d/v1 (%d agents)", options.served_model_name, options.host,
                 options.port, nodes)  # fmt: skip
        serving = asyncio.create_task(_serve(server))
        hangup = asyncio.Event()
        if reload is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hangup.set)
        seen = _mtime(reload.path) if reload else None
        while not serving.done():
            await asyncio.wait({serving}, timeout=WATCH_INTERVAL_S)
            if agents is not None:
                for line in agents.revive():
                    log.warning("%s", line)
            if reload is not None and (hangup.is_set() or _mtime(reload.path) != seen):
                hangup.clear()
                seen = _mtime(reload.path)
                _reload(slot.engine, reload)
        return serving.result()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _reload(engine: Engine, reload: Reload) -> None:
    """The inventory read again and handed to the engine; a broken file keeps the running nodes."""
    from server.inventory import InventoryError

    try:
        nodes = reload.read()
    except InventoryError as exc:
        log.error("inventory not reloaded, still serving the previous one: %s", exc)
        return
    log.info("inventory %s reloaded: %s", reload.path, engine.set_nodes(nodes))


async def _serve(server: uvicorn.Server) -> int:
    # uvicorn calls sys.exit(3) when the app's startup fails (e.g. no agent answers); as a return
    # code it ends the process the same way, without an unretrieved-task warning.
    try:
        await server.serve()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0 if server.started else 1


def run_up(options: ServerOptions, agents: LocalAgents, nodes: Sequence[NodeSpec], start_timeout_s: float) -> int:
    """Start the local agents, serve, and stop every child on the way out, whatever happens."""
    with _signals_raise_shutdown():
        try:
            agents.start()
            agents.wait_ready(start_timeout_s)
            # The agents' CA exists once they are started (a throwaway one unless given).
            return serve_http(dataclasses.replace(options, credentials=agents.server_credentials), nodes, agents)
        except Shutdown:
            log.info("stopping")
            return 0
        except AgentExited as exc:
            log.error("%s", exc)
            return 1
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
            agents.stop()
            log.info("all agents stopped")


@contextmanager
def _signals_raise_shutdown() -> Iterator[None]:
    # uvicorn installs its own handlers while it serves and, after a graceful shutdown, raises
    # the signal again: it then lands here too, so the children are stopped on every path.
    def handler(signum: int, frame: FrameType | None) -> None:
        raise Shutdown(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
