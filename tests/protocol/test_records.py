import pytest

from protocol import PROTOCOL_VERSION
from protocol.records import ModelIdentity, PeerRecord, RecordError


def record(**changes) -> PeerRecord:
    fields = dict(peer_id="QmPeer", model="m", fingerprint="f" * 16, start=0, end=15, state="online",
                  throughput=12.5, addresses=("/ip4/127.0.0.1/tcp/1/p2p/QmPeer",))
    return PeerRecord(**{**fields, **changes})


def test_wire_round_trip():
    original = record(cache_tokens_left=100, public_name="alice")
    assert PeerRecord.from_wire(original.to_wire()) == original


def test_reader_ignores_unknown_fields_from_newer_writers():
    tag, version, fields = record().to_wire()
    fields["added_in_a_later_version"] = [1, 2, 3]
    assert PeerRecord.from_wire((tag, version + 1, fields)) == record()


@pytest.mark.parametrize("wire", [None, 5, ("other", 1, {}), ("swarm.peer", 1, {"start": 0}), ("swarm.peer", 1, [])])
def test_malformed_records_are_rejected(wire):
    with pytest.raises(RecordError):
        PeerRecord.from_wire(wire)


def test_bad_span_or_state_rejected():
    with pytest.raises(RecordError):
        record(start=5, end=5)
    with pytest.raises(RecordError):
        record(state="sleeping")
    tag, version, fields = record().to_wire()
    fields["start"] = "0"
    with pytest.raises(RecordError):
        PeerRecord.from_wire((tag, version, fields))


def test_identity_key_depends_on_fingerprint():
    one, other = ModelIdentity("m", "a" * 16), ModelIdentity("m", "b" * 16)
    assert one.dht_key != other.dht_key
    assert f"v{PROTOCOL_VERSION}" in one.dht_key


def test_parse_skips_other_versions_and_models_with_reasons():
    from protocol.records import parse_peer_records

    identity = ModelIdentity("m", "f" * 16)
    ours = record()
    newer = record(peer_id="QmNew", protocol_version=PROTOCOL_VERSION + 1)
    other_weights = record(peer_id="QmOther", fingerprint="e" * 16)
    records, skipped = parse_peer_records([ours.to_wire(), newer.to_wire(), other_weights.to_wire(), "junk"], identity)
    assert records == [ours]
    assert any("QmNew" in reason and "protocol" in reason for reason in skipped)
    assert any("unreadable" in reason for reason in skipped)
