"""Evidence against a reducer is judged from signatures and arithmetic alone."""

import dataclasses

import torch
from hivemind.compression import serialize_torch_tensor

from protocol.peer_keys import PeerKey
from swarm.robust import get_aggregator
from swarm.training.evidence import (CONSISTENT, Evidence, SignedTensor, contribution_statement, digest, judge,
                                     result_statement)

GROUP = b"group-1"


def make_round(tmp_path, lie: float = 0.0, rule: str = "median"):
    tmp_path.mkdir(exist_ok=True)
    keys = [PeerKey.create_identity_file(tmp_path / f"{index}.key") for index in range(4)]
    reducer, recipient = keys[0], keys[2]
    parts = [torch.randn(50, generator=torch.Generator().manual_seed(index)) for index in range(4)]
    contributions = []
    for key, part in zip(keys, parts):
        serialized = serialize_torch_tensor(part)
        statement = contribution_statement(GROUP, reducer.peer_id, 1, digest(serialized))
        contributions.append(SignedTensor(key.peer_id, serialized.SerializeToString(), key.sign(statement)))
    delta = serialize_torch_tensor(get_aggregator(rule)(parts) - parts[2] + lie)
    result = SignedTensor(reducer.peer_id, delta.SerializeToString(),
                          reducer.sign(result_statement(GROUP, reducer.peer_id, 1, recipient.peer_id, digest(delta))))
    return Evidence(GROUP, 1, recipient.peer_id, tuple(contributions), result), keys


def test_an_honest_result_is_consistent_and_a_lie_is_proven(tmp_path):
    honest, _ = make_round(tmp_path / "honest")
    assert judge(honest, get_aggregator("median")) == CONSISTENT
    lie, _ = make_round(tmp_path / "lying", lie=0.5)
    assert judge(lie, get_aggregator("median")) is None
    assert Evidence.from_wire(lie.to_wire()) == lie
    assert judge(Evidence.from_wire(lie.to_wire()), get_aggregator("median")) is None


def test_forged_or_incomplete_evidence_proves_nothing(tmp_path):
    evidence, keys = make_round(tmp_path, lie=0.5)
    aggregate = get_aggregator("median")
    forged_result = dataclasses.replace(evidence, result=dataclasses.replace(evidence.result, signer=keys[1].peer_id))
    assert "not signed by the accused" in judge(forged_result, aggregate)
    tampered = list(evidence.contributions)
    tampered[3] = dataclasses.replace(tampered[3], tensor=serialize_torch_tensor(torch.zeros(50)).SerializeToString())
    assert "not signed by it" in judge(dataclasses.replace(evidence, contributions=tuple(tampered)), aggregate)
    without_recipient = tuple(item for item in evidence.contributions if item.signer != evidence.recipient)
    assert "leave out the recipient" in judge(dataclasses.replace(evidence, contributions=without_recipient), aggregate)
    assert Evidence.from_wire({"group_id": b"x"}) is None


def test_a_signed_nonfinite_contribution_is_evidence(tmp_path):
    from swarm.training.evidence import NonFiniteEvidence

    key = PeerKey.create_identity_file(tmp_path / "sender.key")

    def signed(values):
        serialized = serialize_torch_tensor(values)
        statement = contribution_statement(GROUP, "reducer", 0, digest(serialized))
        return SignedTensor(key.peer_id, serialized.SerializeToString(), key.sign(statement))

    nan = NonFiniteEvidence(GROUP, "reducer", 0, signed(torch.tensor([1.0, float("nan")])))
    assert nan.holds() and NonFiniteEvidence.from_wire(nan.to_wire()) == nan
    assert not NonFiniteEvidence(GROUP, "reducer", 0, signed(torch.tensor([1.0, 2.0]))).holds()
    assert not NonFiniteEvidence(GROUP, "another reducer", 0, nan.contribution).holds()  # signed for another part
