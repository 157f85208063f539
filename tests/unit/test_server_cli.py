"""The command line: every flag documented, units parsed, and `up`'s agent commands round-trip."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from node_agent.service import AgentSettings
from server.cli import build_parser
from server.inventory import NodeProfile, split_address
from server.launcher import AgentLaunch, LocalAgents, free_port, free_ports, plan_local_agents, threads_per_agent

SUBCOMMANDS = ("init-model", "agent", "serve", "up", "bench")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_flag_has_help(name: str) -> None:
    sub = subparsers(build_parser())[name]
    for action in sub._actions:
        assert action.help, f"{name} {action.option_strings} has no help"
    assert sub.format_help()  # renders without errors


@pytest.mark.parametrize(("suite", "words"), [("prefill", "time-to-first-token of real local clusters"),
                                              ("decode", "inter-token time of real local clusters"),
                                              ("compare", "own forward pass, side by side")])
def test_bench_suite_help_says_what_the_suite_measures(suite: str, words: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["bench", suite, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and words in out and "--lengths" in out  # the shared flags follow
    assert "\n\nEvery " in out or suite == "compare"  # the docstring's paragraphs kept, not refilled
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    overview = " ".join(capsys.readouterr().out.split())  # refilled to the terminal's width
    assert "`potluck bench SUITE --help` describes" in overview and words not in overview
    assert build_parser().parse_args(["bench"]).suite is None  # compare, when run


def test_sizes_and_rates_are_parsed_at_the_edge() -> None:
    args = build_parser().parse_args(["up", "--expert-memory", "512MiB", "--disk-bandwidth", "200MB/s",
                                      "--link-bandwidth", "1Gbit/s", "--agents", "3"])  # fmt: skip
    assert (args.expert_memory, args.disk_bandwidth, args.link_bandwidth) == (512 * 1024**2, 200e6, 125e6)
    assert args.agents == 3 and build_parser().parse_args(["up"]).agents is None and args.port == 8000 and args.host == "127.0.0.1" and args.max_waiting == 64


def test_bad_values_are_refused_with_the_value_quoted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--listen", "127.0.0.1:1", "--model", "m", "--expert-memory", "lots"])
    assert "'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--agents", "2", "--inventory", "x.yaml"])  # one or the other


def test_link_latency_needs_a_unit_and_reaches_the_agent(capsys: pytest.CaptureFixture[str]) -> None:
    agent = ["agent", "--listen", "127.0.0.1:1", "--model", "m"]
    for text, seconds in (("1ms", 1e-3), ("500us", 500e-6), ("0", 0.0)):
        assert build_parser().parse_args([*agent, "--link-latency", text]).link_latency == pytest.approx(seconds)
    assert build_parser().parse_args(agent).link_latency == 0.0
    for bad in ("-1ms", "abc", "2"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*agent, f"--link-latency={bad}"])  # '=': argparse reads -1ms as a flag
        assert repr(bad) in capsys.readouterr().err
    launches = plan_local_agents(1, NodeProfile(0, 0, 0, link_latency_s=0.0025), cores=2)
    args = build_parser().parse_args(LocalAgents(Path("/m"), launches).command(launches[0])[3:])
    assert args.link_latency == pytest.approx(0.0025)


def test_up_starts_agents_with_their_profile_and_a_fair_share_of_cores() -> None:
    profile = NodeProfile(3 * 1024**2, 12.5e6, 1.25e8)
    launches = plan_local_agents(2, profile, cores=2)
    assert [launch.torch_threads for launch in launches] == [1, 1]
    assert len({launch.listen for launch in launches}) == 2
    command = LocalAgents(Path("/models/m"), launches).command(launches[0])
    assert command[1:4] == ["-m", "server.cli", "agent"]
    args = build_parser().parse_args(command[3:])
    assert (args.listen, args.name, args.model) == (launches[0].listen, "agent0", Path("/models/m"))
    assert NodeProfile(args.expert_memory, args.disk_bandwidth, args.link_bandwidth) == profile
    assert args.torch_threads == 1


def test_local_agents_get_distinct_ports_that_are_not_the_api_port() -> None:
    """The kernel may hand one port to consecutive bind(0) calls; `up` must not give the API's
    port (not bound yet while the agents start) or one agent's port to another agent."""
    first = free_port()
    for _ in range(50):
        ports = [split_address(launch.listen)[1] for launch in plan_local_agents(4, NodeProfile(0, 0, 0), avoid={first})]
        assert len(set(ports)) == 4 and first not in ports
    assert len(set(free_ports(8))) == 8


def test_paced_agents_compute_on_one_thread_and_get_their_share() -> None:
    profile = NodeProfile(0, 0, 0, compute_share=0.35)
    launches = plan_local_agents(1, profile, cores=8)
    assert launches[0].torch_threads == 1  # the pacer counts one thread's CPU time
    args = build_parser().parse_args(LocalAgents(Path("/m"), launches).command(launches[0])[3:])
    assert args.compute_share == 0.35
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--compute-share", "2"])
    with pytest.raises(ValueError, match="torch_threads must be 1"):
        AgentSettings(listen="127.0.0.1:1", model_dir=Path("/m"), compute_share=0.5, torch_threads=2, insecure=True)


@pytest.mark.parametrize(("agents", "cores", "threads"), [(2, 2, 1), (3, 2, 1), (2, 16, 8), (4, 18, 4)])
def test_threads_per_agent(agents: int, cores: int, threads: int) -> None:
    assert threads_per_agent(agents, cores) == threads


def test_launch_is_typed_and_frozen() -> None:
    launch = AgentLaunch("a", "127.0.0.1:1", NodeProfile(0, 0, 0), 1)
    with pytest.raises(AttributeError):
        launch.name = "b"  # type: ignore[misc]


def test_the_statistics_window_is_the_replan_period_unless_given() -> None:
    from scheduler.placer import PlacementSettings
    from server.cli_serve import server_options

    def placement(*flags: str) -> PlacementSettings:
        return server_options(build_parser().parse_args(["up", *flags]), Path("/m")).placement

    assert placement().window_s == 300.0 and placement("--replan-every", "60").window_s == 60.0
    given = placement("--replan-every", "86400", "--stats-window", "45")
    assert (given.replan_every_s, given.window_s) == (86400.0, 45.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--stats-window", "0"])
