"""Record ownership: Ed25519 keys and the DHT validator that enforces them.

A protected record's subkey carries its owner's public key (`[owner-ed25519:<hex>]`) and its
value ends with a signature over (key, subkey, value, expiration). DHT nodes reject records
whose signature does not verify, so only a key's owner can publish or change its record. Peer
records (see `protocol.records`) must be protected and must parse; anything else that a
general-purpose DHT stores (hivemind's own averaging keys, say) passes through untouched.
Modelled on hivemind's RSASignatureValidator; Ed25519 signs and verifies far faster than RSA.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from protocol.records import PeerRecord, RecordError, is_peer_record

logger = logging.getLogger(__name__)

_OWNER_RE = re.compile(rb"\[owner-ed25519:([0-9a-f]{64})\]")
_SIGNATURE_RE = re.compile(rb"\[signature-ed25519:([0-9a-f]{128})\]$")


class RecordIdentity:
    """The Ed25519 key a peer signs its records with."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        self.public_key_hex = private_key.public_key().public_bytes_raw().hex()

    @classmethod
    def generate(cls) -> RecordIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def derived_from_file(cls, identity_path: str | Path) -> RecordIdentity:
        """The same libp2p identity file always gives the same record key, so a restarted peer
        keeps owning its record instead of leaving a stale twin until expiry."""
        seed = hashlib.sha256(b"swarm record key v1\0" + Path(identity_path).read_bytes()).digest()
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def owner_subkey(self) -> str:
        return f"[owner-ed25519:{self.public_key_hex}]"

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)


def _signed_bytes(record: DHTRecord) -> bytes:
    return MSGPackSerializer.dumps(dataclasses.astuple(record))


class RecordValidator(RecordValidatorBase):
    """Signs our own protected records, verifies everyone's, and checks peer-record schema."""

    def __init__(self, identity: RecordIdentity | None = None):
        self.identity = identity

    def validate(self, record: DHTRecord) -> bool:
        owners = _OWNER_RE.findall(record.key) + _OWNER_RE.findall(record.subkey or b"")
        signature = _SIGNATURE_RE.search(record.value)
        if not owners:
            return not self._looks_like_peer_record(record.value)  # peer records must be owned
        if len(set(owners)) != 1 or signature is None:
            logger.debug("rejected a DHT record: owner tag without exactly one owner and signature")
            return False
        stripped = dataclasses.replace(record, value=record.value[: signature.start()])
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(owners[0].decode())).verify(
                bytes.fromhex(signature.group(1).decode()), _signed_bytes(stripped)
            )
        except (InvalidSignature, ValueError):
            logger.debug("rejected a DHT record: bad signature")
            return False
        return self._schema_ok(stripped.value)

    def sign_value(self, record: DHTRecord) -> bytes:
        if self.identity is None:
            return record.value
        owner_tag = self.identity.owner_subkey.encode()
        if owner_tag not in record.key and owner_tag not in (record.subkey or b""):
            return record.value
        signature = self.identity.sign(_signed_bytes(record)).hex().encode()
        return record.value + b"[signature-ed25519:" + signature + b"]"

    def strip_value(self, record: DHTRecord) -> bytes:
        signature = _SIGNATURE_RE.search(record.value)
        return record.value if signature is None else record.value[: signature.start()]

    @staticmethod
    def _looks_like_peer_record(value: bytes) -> bool:
        try:
            return is_peer_record(MSGPackSerializer.loads(value))
        except Exception:  # not msgpack at all: not ours to judge
            return False

    @staticmethod
    def _schema_ok(value: bytes) -> bool:
        try:
            wire = MSGPackSerializer.loads(value)
        except Exception:
            return False
        if not is_peer_record(wire):
            return True
        try:
            PeerRecord.from_wire(wire)
        except RecordError as error:
            logger.debug(f"rejected a malformed peer record: {error}")
            return False
        return True

    @property
    def priority(self) -> int:
        return 10  # validate signatures before any validator that deserializes the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RecordValidator)
