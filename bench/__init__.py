"""Benchmarks for haproxy-ln.

`python -m bench.proxy` compares the proxy with a direct connection and with
PgBouncer on one machine, in one run: pgbench throughput and latency, memory
per idle client connection, and Python allocations per relayed message. See
docs/benchmarks.md for what is measured, how, and the results.
"""
