from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the same examples every time (a landing must not hinge on the draw);
# local runs keep exploring new ones
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Daemon, start_nsqd  # noqa: E402

_names = itertools.count()


@pytest.fixture
def unique() -> str:
    """A fresh topic/channel name per test (daemons are shared per module)."""
    return f"t{next(_names)}"


@pytest.fixture(scope="module")
def nsqd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One pynsqd per test module, on ephemeral loopback ports."""
    daemon = start_nsqd(str(tmp_path_factory.mktemp("nsqd")), "--msg-timeout=10s")
    yield daemon
    daemon.stop()
