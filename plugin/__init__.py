"""virtsync: replication, journal and mobility for libvirt/QEMU domains."""
