"""The open-file limit a master needs for its RPC connections.

Every agent holds one RPC connection to the master it talks to, so a cluster
of 10,000 hosts needs more descriptors than the usual soft limit (1,024) or
the server's old fixed cap (4,096). The master raises its soft limit to fit
the configured cap, up to the hard limit; when the hard limit is lower, the
cap shrinks to what fits and one line says so, rather than accept()
failing with EMFILE under load.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("lepton.master")

# Descriptors kept for everything but RPC connections: the Raft journal and
# peers, HTTP clients, block files, the audit log.
RESERVED_FDS = 1024


def fit_connections(want: int, reserved: int = RESERVED_FDS) -> int:
    """Raise the soft open-file limit towards `want` + `reserved`; return how
    many RPC connections fit under the limit now in force (at most `want`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = want + reserved
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError) as exc:
                log.warning("could not raise the open-file limit to %d: %s", new, exc)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return want
    fits = max(16, soft - reserved)
    log.warning(
        "open-file limit %d (hard %s) fits %d RPC connections, not the %d configured: "
        "raise the hard limit (LimitNOFILE=) to serve that many agents",
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        fits,
        want,
    )
    return fits
