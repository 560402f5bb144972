"""pynsqd: NSQ's nsqd, wire-compatible, on trio."""

__version__ = "0.1.0"

# the nsqd release whose behaviour we reproduce
NSQ_VERSION = "1.3.0"


def version_string(app: str = "nsqd") -> str:
    """What ``--version`` prints; harnesses match ``nsqd v<semver>(-[a-z]+)? (built w/...)``."""
    return f"{app} v{NSQ_VERSION}-compatible (built w/pynsqd-{__version__})"
