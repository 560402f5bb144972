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
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")
    assert "/ping" in argv[2] and "4151" in argv[2]


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
