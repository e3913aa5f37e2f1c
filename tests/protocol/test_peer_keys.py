"""Ed25519 libp2p identities: the peer id p2pd derives names the key we sign with."""

import asyncio

import pytest

from protocol.network import NetworkOptions, start_p2p
from protocol.peer_keys import IdentityKeyError, PeerKey, verify


def test_signatures_verify_from_the_peer_id_alone(tmp_path):
    key = PeerKey.create_identity_file(tmp_path / "identity.key")
    signature = key.sign(b"statement")
    assert verify(key.peer_id, b"statement", signature)
    assert not verify(key.peer_id, b"another statement", signature)
    other = PeerKey.create_identity_file(tmp_path / "other.key")
    assert not verify(other.peer_id, b"statement", signature)
    assert not verify("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", b"statement", signature)  # RSA: unverifiable
    assert not verify("not a peer id", b"statement", signature)
    assert PeerKey.from_identity_file(tmp_path / "identity.key").peer_id == key.peer_id
    assert (tmp_path / "identity.key").stat().st_mode & 0o077 == 0  # owner-only


def test_p2pd_derives_the_same_peer_id(tmp_path):
    key = PeerKey.create_identity_file(tmp_path / "identity.key")

    async def started_id() -> str:
        p2p = await start_p2p(NetworkOptions(identity_path=str(tmp_path / "identity.key")))
        try:
            return p2p.peer_id.to_base58()
        finally:
            await p2p.shutdown()

    assert asyncio.run(started_id()) == key.peer_id


def test_an_rsa_identity_is_refused_with_what_to_do(tmp_path):
    from hivemind.p2p import P2P

    P2P.generate_identity(str(tmp_path / "rsa.key"))
    with pytest.raises(IdentityKeyError, match="give a path that does not exist"):
        PeerKey.from_identity_file(tmp_path / "rsa.key")
