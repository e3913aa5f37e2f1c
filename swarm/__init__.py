"""The swarm client library: discovery, routing, inference sessions, the distributed model."""

from swarm.model import DistributedModelForCausalLM

__all__ = ["DistributedModelForCausalLM"]
