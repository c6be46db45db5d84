"""Shell: one node's agent: the HA loop driving proxy gate, replicator, keys and daemon."""
