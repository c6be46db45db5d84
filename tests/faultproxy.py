from haproxy_ln.local.faultproxy import FaultProxy, Mode  # noqa: F401  (moved there)
