"""pynsqadmin: NSQ's nsqadmin web UI, server-rendered, with its own graphs, on trio."""

from .nsqadmin import NSQAdmin, open_nsqadmin
from .options import Options

__all__ = ["NSQAdmin", "Options", "open_nsqadmin"]
