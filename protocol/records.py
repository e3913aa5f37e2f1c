"""The peer record a peer publishes in the DHT, and the keys it is published under.

One DHT key per model identity (name + weights fingerprint); each peer owns one subkey of it,
named after its record-signing key, so only the owner can change its own record
(see `protocol.signing`). The wire form is a versioned tuple `(RECORD_FORMAT, fields)` whose
reader ignores unknown fields, so later versions can add fields without breaking old readers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal, NewType

from protocol import PROTOCOL_VERSION

PeerId = NewType("PeerId", str)
"""A libp2p peer id in base58 (`Qm...`)."""

PeerState = Literal["joining", "online", "draining", "offline"]
PEER_STATES: tuple[PeerState, ...] = ("joining", "online", "draining", "offline")

RECORD_FORMAT = 1
RECORD_TAG = "swarm.peer"


class RecordError(ValueError):
    """A DHT value that is not a readable peer record."""


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """Which weights a peer serves: peers with another fingerprint never join the same route."""

    name: str
    fingerprint: str

    @property
    def dht_key(self) -> str:
        return f"swarm/v{PROTOCOL_VERSION}/models/{self.name}/{self.fingerprint}/peers"


@dataclasses.dataclass(frozen=True)
class PeerRecord:
    peer_id: PeerId
    model: str
    fingerprint: str
    start: int
    end: int  # exclusive
    state: PeerState
    throughput: float  # tokens/s this peer can push through its whole span
    protocol_version: int = PROTOCOL_VERSION
    dtype: str = "float32"
    cache_tokens_left: int = 0  # attention cache room left, in tokens of this span
    max_session_length: int = 0  # tokens per session this peer accepts
    sessions_left: int = 0  # more sessions it accepts now
    network_bandwidth: float = 0.0  # bytes/s, from a timed transfer to another peer (0: not measured)
    addresses: tuple[str, ...] = ()
    public_name: str = ""
    software_version: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise RecordError(f"bad block span {self.start}:{self.end}")
        if self.state not in PEER_STATES:
            raise RecordError(f"unknown peer state {self.state!r}")

    def to_wire(self) -> tuple[Any, ...]:
        fields = dataclasses.asdict(self)
        fields["addresses"] = list(self.addresses)
        return (RECORD_TAG, RECORD_FORMAT, fields)

    @classmethod
    def from_wire(cls, wire: Any) -> PeerRecord:
        try:
            tag, record_format, fields = wire
        except (TypeError, ValueError) as error:
            raise RecordError("not a peer record tuple") from error
        if tag != RECORD_TAG or not isinstance(fields, dict):
            raise RecordError("not a peer record")
        if not isinstance(record_format, int) or record_format < 1:
            raise RecordError(f"bad record format {record_format!r}")
        known = {field.name for field in dataclasses.fields(cls)}
        kept = {name: value for name, value in fields.items() if name in known}  # forward compatible
        try:
            kept["addresses"] = tuple(str(address) for address in kept.get("addresses", ()))
            record = cls(**kept)
        except TypeError as error:
            raise RecordError(f"peer record misses fields: {error}") from error
        for name, kind in (("start", int), ("end", int), ("throughput", (int, float)), ("peer_id", str)):
            if not isinstance(getattr(record, name), kind):
                raise RecordError(f"peer record field {name} has type {type(getattr(record, name)).__name__}")
        return record


def is_peer_record(wire: Any) -> bool:
    return isinstance(wire, (tuple, list)) and len(wire) == 3 and wire[0] == RECORD_TAG


def parse_peer_records(values: Iterable[Any], identity: ModelIdentity) -> tuple[list[PeerRecord], list[str]]:
    """The usable records of one model among raw DHT values, and why the others were skipped."""
    records, skipped = [], []
    for value in values:
        try:
            record = PeerRecord.from_wire(value)
        except RecordError as error:
            skipped.append(f"an unreadable peer record ({error})")
            continue
        if record.protocol_version != PROTOCOL_VERSION:
            skipped.append(f"peer {record.peer_id}: it speaks protocol {record.protocol_version}, "
                           f"this software {PROTOCOL_VERSION} (upgrade the older side)")
        elif (record.model, record.fingerprint) == (identity.name, identity.fingerprint):
            records.append(record)
    return records, skipped
