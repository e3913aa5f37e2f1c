"""The swarm client library: discovery, routing, inference sessions, the distributed model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm.model import DistributedModelForCausalLM

__all__ = ["DistributedModelForCausalLM"]


def __getattr__(name: str) -> Any:
    """`DistributedModelForCausalLM` is imported on first use: it pulls in transformers' model
    classes (5 s here), which `swarm dht`, `swarm train` and `swarm status` never need."""
    if name == "DistributedModelForCausalLM":
        from swarm.model import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
