"""The replication engine: the primary's cycles and the secondary's replicas."""
