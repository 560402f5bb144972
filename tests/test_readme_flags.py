"""README.md documents every flag of the three daemons, generated from the options
definitions: this fails when it drifts (fix: ``python -m pynsqd.docs``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pynsqd import docs
from pynsqd.flags import flags_of
from pynsqd.options import Options as NSQDOptions
from pynsqadmin.options import Options as AdminOptions
from pynsqlookupd.options import Options as LookupdOptions

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_readme_flag_tables_are_up_to_date() -> None:
    text = README.read_text(encoding="utf-8")
    assert docs.BEGIN in text and docs.END in text
    assert docs.update_readme(text) == text, "README.md flag tables are out of date: run `python -m pynsqd.docs`"


def test_every_visible_flag_is_documented_once_per_daemon() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(docs.BEGIN) : text.index(docs.END)]
    nsqd_part, rest = section.split("### `pynsqlookupd` flags")
    lookupd_part, admin_part = rest.split("### `pynsqadmin` flags")
    for part, options in ((nsqd_part, NSQDOptions), (lookupd_part, LookupdOptions), (admin_part, AdminOptions)):
        for flag in flags_of(options):
            row = f"| `--{flag.name}` |"
            assert part.count(row) == (0 if flag.hidden else 1), flag.name


def test_host_dependent_defaults_are_not_baked_in() -> None:
    import socket

    table = docs.flag_table(flags_of(NSQDOptions))
    assert f"`{socket.gethostname()}`" not in table
    assert "crc32(md5(hostname))" in table


def test_the_first_two_commands_are_untouched() -> None:
    text = README.read_text(encoding="utf-8")
    run = text.index("<!-- run-command -->")
    test = text.index("<!-- test-command -->")
    assert run < test < text.index(docs.BEGIN)
    assert text[test:].split("```")[1].strip() == (
        "sh\npython3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q"
    )


def test_update_appends_then_replaces() -> None:
    base = "# title\n\nsome text\n"
    once = docs.update_readme(base)
    assert once.startswith(base) and once.count(docs.BEGIN) == 1
    assert docs.update_readme(once) == once
    stale = once.replace("| `--mem-queue-size` |", "| `--mem-queue-sized` |")
    assert docs.update_readme(stale) == once


def test_check_mode_of_the_generator(tmp_path) -> None:
    good = subprocess.run([sys.executable, "-m", "pynsqd.docs", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    stale = tmp_path / "README.md"
    stale.write_text("# nothing generated yet\n")
    bad = subprocess.run([sys.executable, "-m", "pynsqd.docs", "--check", f"--readme={stale}"], capture_output=True, text=True)
    assert bad.returncode == 1 and "out of date" in bad.stderr
    assert stale.read_text() == "# nothing generated yet\n"
    fixed = subprocess.run([sys.executable, "-m", "pynsqd.docs", f"--readme={stale}"], capture_output=True, text=True)
    assert fixed.returncode == 0 and docs.BEGIN in stale.read_text()
