"""The Lightning daemon simulator: a daemon's database habits, without bitcoind.

It plays Core Lightning (`cln` mode: one connection, PQexecParams-style
statements, the optimistic data_version check) or lnd (`lnd` mode: a
key/value tree written in SERIALIZABLE transactions from a pool, unlocked over
gRPC first), writes channel updates through whatever DSN it is given (the
haproxy-ln proxy in a drill), and journals every state it acknowledged. The
checker compares journals with the surviving database: lost writes and split
brain. See docs/sim.md.

Nothing is imported here, so `haproxy-ln` loads psycopg and grpcio only when
a `sim` command runs; import from the modules:

    runner.py   Simulator, SimSettings: one run, start to stop
    cln.py      cln mode          lnd.py     lnd mode (kv tree, workers)
    wallet.py   lnd's GetState / UnlockWallet server over TLS
    model.py    pure: channel states, updates, digests, the pacer
    journal.py  the acknowledged-state journal
    checker.py  journals vs. database
    command.py  `haproxy-ln sim run` / `sim check`
"""
