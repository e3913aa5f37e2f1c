"""The peer daemon: serves a span of transformer blocks to the swarm."""
