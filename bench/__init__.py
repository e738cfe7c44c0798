"""Replication benchmarks (``make bench``): virtsync against qemu-img convert and
virtnbdbackup, ratios measured side by side in one lab; see ``docs/bench/``."""
