import dataclasses

from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer

from protocol.records import PeerRecord
from protocol.signing import RecordIdentity, RecordValidator


def peer_record_bytes(**changes) -> bytes:
    fields = dict(peer_id="QmPeer", model="m", fingerprint="f" * 16, start=0, end=4, state="online", throughput=1.0)
    return MSGPackSerializer.dumps(PeerRecord(**{**fields, **changes}).to_wire())


def signed(identity: RecordIdentity, value: bytes, subkey: str | None = None) -> DHTRecord:
    record = DHTRecord(b"key-id", MSGPackSerializer.dumps(subkey or identity.owner_subkey), value, 1e10)
    return dataclasses.replace(record, value=RecordValidator(identity).sign_value(record))


def test_owner_signed_record_validates_and_strips():
    identity = RecordIdentity.generate()
    record = signed(identity, peer_record_bytes())
    validator = RecordValidator()
    assert validator.validate(record)
    assert validator.strip_value(record) == peer_record_bytes()


def test_tampered_value_or_expiration_is_rejected():
    identity = RecordIdentity.generate()
    record = signed(identity, peer_record_bytes())
    tampered = record.value.replace(b"online", b"offlin")
    assert not RecordValidator().validate(dataclasses.replace(record, value=tampered))
    assert not RecordValidator().validate(dataclasses.replace(record, expiration_time=2e10))


def test_nobody_else_can_write_an_owned_subkey():
    owner, attacker = RecordIdentity.generate(), RecordIdentity.generate()
    forged = signed(attacker, peer_record_bytes(), subkey=owner.owner_subkey)
    assert forged.value == peer_record_bytes()  # the attacker's key does not sign another owner's subkey
    assert not RecordValidator().validate(forged)


def test_unsigned_or_malformed_peer_records_are_rejected():
    unsigned = DHTRecord(b"key-id", MSGPackSerializer.dumps("anything"), peer_record_bytes(), 1e10)
    assert not RecordValidator().validate(unsigned)
    identity = RecordIdentity.generate()
    broken = signed(identity, MSGPackSerializer.dumps(("swarm.peer", 1, {"start": 3})))
    assert not RecordValidator().validate(broken)


def test_other_dht_values_pass_through():
    plain = DHTRecord(b"key-id", MSGPackSerializer.dumps("subkey"), MSGPackSerializer.dumps({"x": 1}), 1e10)
    assert RecordValidator().validate(plain)


def test_identity_file_gives_a_stable_key(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"some private key bytes")
    first = RecordIdentity.derived_from_file(path).owner_subkey
    assert RecordIdentity.derived_from_file(path).owner_subkey == first
    path.write_bytes(b"another key")
    assert RecordIdentity.derived_from_file(path).owner_subkey != first
