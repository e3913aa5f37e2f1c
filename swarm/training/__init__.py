"""Training on the swarm: collaborative training of replicas by decentralized averaging."""

from swarm.training.averager import AveragingOptions
from swarm.training.optimizer import CollaborativeOptimizer

__all__ = ["AveragingOptions", "CollaborativeOptimizer"]
