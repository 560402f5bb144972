"""pynsqlookupd: NSQ's nsqlookupd, wire-compatible, on trio."""

from .nsqlookupd import NSQLookupd, open_nsqlookupd
from .options import Options

__all__ = ["NSQLookupd", "Options", "open_nsqlookupd"]
