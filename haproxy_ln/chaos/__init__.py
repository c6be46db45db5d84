"""The fault-injection suite, `haproxy-ln chaos`: a workload, a nemesis, a checker, many trials.

How this works, in the spirit of Jepsen:

- `pair.py` builds the system under test on this machine: a 3-member etcd
  cluster, two PostgreSQL clusters (on small tmpfs mounts, so a disk can be
  filled), two `haproxy-ln run` agents, and fault proxies wherever a link
  can be cut: each agent reaches each etcd member through its own proxy, and
  each replicator reaches the peer's database through one. The workload is
  the Lightning simulator (cln or lnd mode) as each node's daemon, which
  journals every channel state it acknowledged.
- `nemesis.py` holds the faults, each injected at a random moment during
  traffic and healed afterwards; `hostile.py` is the hostile-client burst.
- `checker.py` is pure: from the agents' safety events (monotonic times),
  the chaos log and the journals it derives who held the keys and ran the
  daemon when, who held a valid lease when, and the outage; the
  simulator's checker compares the journals with the databases.
- `trials.py` runs trials on one pair, with a recovery phase between them
  (heal, restart what is dead, wait until the pair is synchronous again;
  rebuild the pair if that fails), writes one JSON line per trial, and
  `report.py` sums them up.

See docs/reliability.md for what is claimed, under which assumptions.
"""
