"""gRPC metadata keys of the wire contract: the part of it that lives in headers and trailers, not in messages.

NOT_ACTIVE_KEY: trailer of an admin change refused with FAILED_PRECONDITION by a standby manager (one that does not
hold the lease over the hosts); its value is the lease holder's id, or "" when nobody holds it. The standby refused
before it looked at the request, so nothing was applied: a client may send the same request to another manager.
"""

from __future__ import annotations

NOT_ACTIVE_KEY = "kvmha-not-active"
