"""Signatures that anyone can check from a peer id alone.

A libp2p peer id of an Ed25519 identity (`12D3KooW...`) embeds the public key itself (an
identity multihash of the protobuf-encoded key). So when a peer's libp2p identity is an Ed25519
key we wrote, the peer can sign statements (e.g. "I sent this tensor in that round") with the
same key its peer id names, and a third party can verify them without trusting any directory
of keys. hivemind writes RSA identities (`Qm...` ids hash the key instead): those cannot be
checked from the id, so evidence-bearing work (accountable averaging) uses Ed25519 identities.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from protocol.network import NetworkOptions

# identity multihash (0x00), length 36, then the protobuf PublicKey: Type=Ed25519 (0x08 0x01), Data (0x12 0x20)
_ED25519_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


class IdentityKeyError(ValueError):
    pass


class PeerKey:
    """This peer's Ed25519 libp2p identity: it signs, its peer id verifies."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        public = private_key.public_key().public_bytes_raw()
        self.peer_id = PeerID(_ED25519_ID_PREFIX + public).to_base58()

    @classmethod
    def create_identity_file(cls, path: str | Path) -> PeerKey:
        """A new identity file in libp2p's format (owner-only), for P2P's `identity_path`."""
        key = cls(Ed25519PrivateKey.generate())
        raw = key._private_key.private_bytes_raw() + key._private_key.public_key().public_bytes_raw()
        data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=raw).SerializeToString()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        return key

    @classmethod
    def from_identity_file(cls, path: str | Path) -> PeerKey:
        message = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
        if message.key_type != crypto_pb2.KeyType.Ed25519:
            raise IdentityKeyError(f"{path} holds a {crypto_pb2.KeyType.Name(message.key_type)} identity; signed "
                                   f"evidence needs an Ed25519 one: give a path that does not exist yet and one is made")
        return cls(Ed25519PrivateKey.from_private_bytes(message.data[:32]))

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` was made by the key that `peer_id` names."""
    try:
        raw = PeerID.from_base58(peer_id).to_bytes()
    except Exception:
        return False
    if not raw.startswith(_ED25519_ID_PREFIX) or len(raw) != len(_ED25519_ID_PREFIX) + 32:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(raw[len(_ED25519_ID_PREFIX):]).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def accountable_identity(network: NetworkOptions
                         ) -> tuple[NetworkOptions, PeerKey, tempfile.TemporaryDirectory | None]:
    """An Ed25519 libp2p identity to sign rounds with: the one at `identity_path` (made there if the
    file does not exist yet), or a fresh one in a temporary folder the caller removes when done."""
    if network.identity_path is not None:
        path = Path(network.identity_path)
        key = PeerKey.from_identity_file(path) if path.exists() else PeerKey.create_identity_file(path)
        return network, key, None
    folder = tempfile.TemporaryDirectory(prefix="swarm-identity-")
    path = Path(folder.name) / "identity.key"
    key = PeerKey.create_identity_file(path)
    return dataclasses.replace(network, identity_path=str(path)), key, folder
