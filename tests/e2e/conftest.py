"""Fixtures of the e2e tier: lab hosts with their own libvirtd (tests.lab.fixtures)."""

from tests.lab.fixtures import *  # noqa: F401,F403
