"""Fixtures of the swarm-level tests that need a network: a real `swarm dht` bootstrap per module."""

import pytest

from swarm.local_swarm import LocalSwarm


@pytest.fixture(scope="module")
def initial_peers():
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        yield local.initial_peers
