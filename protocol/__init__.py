"""The wire contract of the swarm: records, messages, tensors, identities. No peer or client logic."""

PROTOCOL_VERSION = 1
"""Bumped on any change that an older peer or client cannot read; readers skip peers on another version."""

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""hivemind's persistent connection caps one message at 4 MiB."""

FRAME_PAYLOAD_BYTES = 2 * 1024 * 1024
"""Payload bytes per frame: well under the cap, leaving room for framing and protobuf overhead."""
