"""HTTP health endpoints, `/status` and Prometheus metrics of the agent (docs/health.md).

`model` and `rules` are pure (the report and the 200/503 rules); `store`
reads replication facts from PostgreSQL, `collect` builds a report from the
running agent, `app` is the ASGI application, `server` runs it with
hypercorn in the agent's nursery, and `status` is `haproxy-ln status`.
"""
