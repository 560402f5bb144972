"""The Dockerfile, without a Docker engine: every instruction is one Docker
knows, exec forms are JSON arrays, and what it runs exists in the package."""

from __future__ import annotations

import json
import shlex
import tomllib
from importlib.metadata import distribution
from pathlib import Path

import pytest

from pynsqd.flags import resolve
from pynsqd.options import Options as NSQDOptions
from pynsqlookupd.options import Options as LookupdOptions

ROOT = Path(__file__).resolve().parent.parent

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}
HEALTHCHECK_OPTIONS = {"--interval", "--timeout", "--start-period", "--start-interval", "--retries"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comments inside a continuation are dropped by Docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        line = pending + stripped
        pending = ""
        word, _, args = line.partition(" ")
        out.append((word, args.strip()))
    assert not pending, "the last instruction ends with a continuation"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def console_scripts() -> dict[str, str]:
    return {ep.name: ep.value for ep in distribution("pynsqd").entry_points if ep.group == "console_scripts"}


def args_of(instructions, name: str) -> list[str]:
    return [a for w, a in instructions if w == name]


def test_every_line_is_a_known_instruction(instructions) -> None:
    assert instructions, "empty Dockerfile"
    for word, _ in instructions:
        assert word in INSTRUCTIONS and word == word.upper(), word
    assert instructions[0][0] == "FROM"


def test_slim_python_base_and_non_root_user(instructions) -> None:
    (base,) = args_of(instructions, "FROM")
    image, _, tag = base.partition(":")
    assert image == "python" and tag.endswith("-slim"), base
    users = args_of(instructions, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the user is created in the image before it is used
    assert any("useradd" in a and users[-1].split(":")[0] in a for a in args_of(instructions, "RUN"))


def test_ports_volume_and_healthcheck(instructions) -> None:
    exposed = {p for a in args_of(instructions, "EXPOSE") for p in a.split()}
    assert {"4150", "4151", "4152", "4160", "4161"} <= exposed
    volumes = []
    for a in args_of(instructions, "VOLUME"):
        volumes += exec_form(a) if a.startswith("[") else a.split()
    assert "/data" in volumes
    (health,) = args_of(instructions, "HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    for opt in options.split():
        assert opt.split("=")[0] in HEALTHCHECK_OPTIONS, opt
    argv = exec_form(command)
    # the health check asks the daemon on the port it was configured with,
    # not a hard-coded one (tests/test_healthcheck.py runs it)
    assert argv == ["python", "-m", "pynsqd.healthcheck"]
    assert not any(port in health for port in ("4150", "4151", "4161", "4171"))


def test_entrypoint_runs_an_installed_console_script(instructions, console_scripts) -> None:
    for word in ("ENTRYPOINT", "CMD"):
        for a in args_of(instructions, word):
            assert a.startswith("["), f"{word} must use the JSON exec form: {a}"
            exec_form(a)
    (entry,) = args_of(instructions, "ENTRYPOINT")
    argv = exec_form(entry)
    assert argv[0] in console_scripts, (argv[0], console_scripts)
    assert console_scripts[argv[0]] == "pynsqd.main:main"
    assert "--data-path=/data" in argv
    # the flags it passes are ones pynsqd accepts
    opts, _ = resolve(NSQDOptions, argv[1:])
    assert opts.data_path == "/data"
    # the image's other daemon, run with --entrypoint pynsqlookupd, is installed too
    assert "pynsqlookupd" in console_scripts
    resolve(LookupdOptions, [])


def test_console_scripts_match_pyproject(console_scripts) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {k: v for k, v in console_scripts.items() if k in scripts} == scripts


def test_copied_sources_exist(instructions) -> None:
    for a in args_of(instructions, "COPY"):
        parts = shlex.split(a)
        for src in [p for p in parts[:-1] if not p.startswith("--")]:
            assert (ROOT / src).exists(), src


def test_parser_handles_continuations_and_comments() -> None:
    parsed = parse_dockerfile("# c\nFROM python:3.12-slim\nRUN a \\\n    # inner\n    && b\n\nCMD [\"x\"]\n")
    assert parsed == [("FROM", "python:3.12-slim"), ("RUN", "a && b"), ("CMD", '["x"]')]


# ---------------------------------------------------------------- docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict:
    import yaml

    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def _argv(service: dict, image_entrypoint: list[str]) -> list[str]:
    entry = service.get("entrypoint", image_entrypoint)
    entry = entry if isinstance(entry, list) else shlex.split(entry)
    command = service.get("command", [])
    command = command if isinstance(command, list) else shlex.split(command)
    return [*entry, *command]


def test_compose_two_lookupds_two_nsqds_registered_with_both(compose, instructions, console_scripts) -> None:
    from pynsqadmin.options import Options as AdminOptions

    services = compose["services"]
    (entry,) = args_of(instructions, "ENTRYPOINT")
    image_entrypoint = exec_form(entry)
    ours = {name: s for name, s in services.items() if s.get("image") == "pynsqd" or "build" in s}
    by_program: dict[str, list[tuple[str, object]]] = {}
    for name, service in ours.items():
        argv = _argv(service, image_entrypoint)
        program = argv[0]
        assert program in console_scripts, (name, program)
        options_cls = {"pynsqd": NSQDOptions, "pynsqlookupd": LookupdOptions, "pynsqadmin": AdminOptions}[program]
        opts, _ = resolve(options_cls, argv[1:])  # every flag is one the daemon takes
        by_program.setdefault(program, []).append((name, opts))
    lookupds = by_program["pynsqlookupd"]
    nsqds = by_program["pynsqd"]
    assert len(lookupds) == 2 and len(nsqds) == 2
    lookupd_tcp = {f"{name}:{opts.tcp_address.rsplit(':', 1)[1]}" for name, opts in lookupds}
    lookupd_http = {f"{name}:{opts.http_address.rsplit(':', 1)[1]}" for name, opts in lookupds}
    for name, opts in nsqds:
        assert set(opts.lookupd_tcp_addresses) == lookupd_tcp, name
        assert opts.broadcast_address == name  # what the lookupds hand out resolves in the compose network
        assert opts.data_path == "/data" and any(v.endswith(":/data") for v in services[name]["volumes"])
        assert set(services[name]["depends_on"]) == {n for n, _ in lookupds}
    ((admin_name, admin),) = by_program["pynsqadmin"]
    assert set(admin.lookupd_http_addresses) == lookupd_http
    # named volumes are declared; published host ports do not clash
    for name, service in services.items():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], (name, volume)
        for dep in service.get("depends_on", {}):
            assert dep in services, (name, dep)
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_compose_offers_gos_nsqadmin_against_the_same_cluster(compose) -> None:
    go = compose["services"]["go-nsqadmin"]
    assert go["image"].startswith("nsqio/nsq:")
    assert go["profiles"]  # only when asked for: docker compose --profile go-nsqadmin up
    argv = go["command"]
    assert argv[0] == "/nsqadmin"
    assert {a.split("=", 1)[1] for a in argv if a.startswith("--lookupd-http-address=")} == {"nsqlookupd1:4161", "nsqlookupd2:4161"}
