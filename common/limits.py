"""Fitting the connection limit to the process's file-descriptor limit.

A relayed connection holds up to FDS_PER_CONNECTION descriptors (two sockets, and two pipes of
two fds each for the splice engine). If `--max-connections` allows more connections than the fd
limit can hold, a burst ends in EMFILE halfway through a connection (a pipe or the tunnel socket
cannot be made) instead of the clean behaviour at the limit: the accept loop pauses and the
kernel backlog holds new connections. So the soft limit is raised to the hard one, and the
connection limit lowered to what the fds allow, with one log line.
"""

from __future__ import annotations

import logging
import resource

FDS_PER_CONNECTION = 6
DEFAULT_MAX_CONNECTIONS = 4096  # when --max-connections is not given
RESERVED_FDS = 32  # listeners, the event loop, logs, resolver threads, the stats file


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def fit_connections(requested: int | None, logger: logging.Logger, listeners: int = 1) -> int:
    """`requested` per listener (None: the default), lowered so that every listener's
    connections fit the fd limit.

    Lowering a limit the user set is worth an info line; lowering the default is not (the
    process still serves as many connections as its fds hold): that goes to debug.
    """
    nofile = raise_nofile()
    fit = max(1, (nofile - RESERVED_FDS) // FDS_PER_CONNECTION // max(1, listeners))
    chosen = requested is not None
    if requested is None:
        requested = DEFAULT_MAX_CONNECTIONS
    if requested <= fit:
        return requested
    logger.log(
        logging.INFO if chosen else logging.DEBUG,
        "open-file limit %d holds only %d connections%s: --max-connections lowered from %d "
        "(raise `ulimit -n` / LimitNOFILE for more)",
        nofile,
        fit,
        f" per listener ({listeners} listeners)" if listeners > 1 else "",
        requested,
    )
    return fit
