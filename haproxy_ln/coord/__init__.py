"""Shell: etcd lease, leader key, sync record and watch for the HA loop (see `coord.coord`)."""

from haproxy_ln.coord.coord import DEFAULT_SUCCESSOR_TTL, Coord, open_coord
from haproxy_ln.coord.model import (
    CoordView,
    Leader,
    Lease,
    Successor,
    SwitchoverRequest,
    SyncRecord,
)

__all__ = [
    "DEFAULT_SUCCESSOR_TTL",
    "Coord",
    "CoordView",
    "Leader",
    "Lease",
    "Successor",
    "SwitchoverRequest",
    "SyncRecord",
    "open_coord",
]
