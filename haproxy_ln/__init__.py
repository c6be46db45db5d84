"""haproxy-ln: high availability for Lightning Network nodes."""

__version__ = "0.1.0"
