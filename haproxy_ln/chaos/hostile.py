"""Hostile clients: a burst of broken and malicious connections on a proxy port.

How this works: `burst(port, seconds, rng)` runs a few threads for
`seconds`; each opens connection after connection and does one of:

- `garbage`: random bytes (so a random startup length), then close;
- `oversized_startup`: a startup packet announcing 2 GiB;
- `oversized_message`: a proper startup (trust auth), then a query
  message announcing 2 GiB and a few bytes of it;
- `half_open`: a partial startup packet, then silence; kept open until the
  burst ends, as a slowloris would;
- `connect_only`: connect and send nothing, kept open likewise.

The proxy must cap every length, drop each such client, and go on serving
the daemon; the trial checks the last part (the outage) and the invariants.
Returns how many connections of each kind were made.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time

__all__ = ["KINDS", "burst"]

KINDS = ("garbage", "oversized_startup", "oversized_message", "half_open", "connect_only")
THREADS = 6
HUGE = 0x7FFFFFF0


def _startup(user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608)  # protocol 3.0
    body += b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    return struct.pack("!I", len(body) + 4) + body


def _drain(sock: socket.socket, seconds: float) -> None:
    """Read until the peer closes or `seconds` pass."""
    sock.settimeout(seconds)
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _one(port: int, kind: str, rng: random.Random, held: list[socket.socket]) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=2.0)
    keep = False
    try:
        if kind == "garbage":
            sock.sendall(rng.randbytes(rng.randint(1, 4096)))
            _drain(sock, 0.5)
        elif kind == "oversized_startup":
            sock.sendall(struct.pack("!II", HUGE, 196608) + b"user\0")
            _drain(sock, 0.5)
        elif kind == "oversized_message":
            sock.sendall(_startup("postgres", "lightning"))
            sock.settimeout(1.0)
            with contextlib.suppress(OSError):
                sock.recv(65536)  # authentication and parameters, or a refusal
            sock.sendall(b"Q" + struct.pack("!I", HUGE) + b"SELECT 1")
            _drain(sock, 1.0)
        elif kind == "half_open":
            sock.sendall(_startup("postgres", "lightning")[: rng.randint(1, 7)])
            keep = True
        else:
            keep = True
    except OSError:
        pass
    if keep:
        held.append(sock)
    else:
        sock.close()


def burst(port: int, seconds: float, rng: random.Random) -> dict[str, int]:
    """Hostile connections to 127.0.0.1:`port` for `seconds`; counts per kind."""
    counts = dict.fromkeys(KINDS, 0)
    held: list[socket.socket] = []
    lock = threading.Lock()
    until = time.monotonic() + seconds
    seeds = [rng.randrange(2**32) for _ in range(THREADS)]

    def worker(seed: int) -> None:
        mine = random.Random(seed)
        while time.monotonic() < until:
            kind = mine.choice(KINDS)
            with contextlib.suppress(OSError):
                _one(port, kind, mine, held)
            with lock:
                counts[kind] += 1

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    for sock in held:
        sock.close()
    return counts
