"""Command-line tools built on the client: ``pynsq_tail``, ``pynsq_to_nsq``,
``pynsq_stat`` (nsq_tail, to_nsq and nsq_stat with the same flags)."""
