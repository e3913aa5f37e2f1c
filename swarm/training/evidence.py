"""Signed statements of an all-reduce round, and the evidence that convicts a lying reducer.

In a butterfly all-reduce each member reduces one slice of the group's tensors for everyone. A
Byzantine reducer can return anything. So every part a sender sends is signed (a *contribution*:
this tensor, for this reducer's part, in this round) and every result a reducer sends back is
signed (a *result*: this delta, for this recipient). A verifier asks a reducer to reveal the
signed contributions it combined; if the reducer's signed result does not follow from them by
the run's rule, the bundle of signatures is proof that anyone can check from peer ids alone
(`protocol.peer_keys`): no one has to trust the accuser.

Pure functions and a wire form; no network here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from protocol import peer_keys

Aggregate = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def digest(serialized: runtime_pb2.Tensor) -> bytes:
    return hashlib.sha256(serialized.buffer).digest()


def contribution_statement(group_id: bytes, reducer: str, part_index: int, tensor_digest: bytes) -> bytes:
    return msgpack.packb(["swarm contribution v1", group_id, reducer, part_index, tensor_digest])


def result_statement(group_id: bytes, reducer: str, part_index: int, recipient: str, tensor_digest: bytes) -> bytes:
    return msgpack.packb(["swarm result v1", group_id, reducer, part_index, recipient, tensor_digest])


@dataclasses.dataclass(frozen=True)
class SignedTensor:
    signer: str  # peer id (base58)
    tensor: bytes  # a serialized runtime_pb2.Tensor
    signature: bytes

    def decoded(self) -> torch.Tensor:
        return deserialize_torch_tensor(runtime_pb2.Tensor.FromString(self.tensor))

    def tensor_digest(self) -> bytes:
        return digest(runtime_pb2.Tensor.FromString(self.tensor))


@dataclasses.dataclass(frozen=True)
class Evidence:
    """That `result.signer` (the reducer) answered `recipient` a delta for part `part_index` of
    round `group_id` that the signed `contributions` it revealed do not produce."""
    group_id: bytes
    part_index: int
    recipient: str
    contributions: tuple[SignedTensor, ...]
    result: SignedTensor

    @property
    def reducer(self) -> str:
        return self.result.signer

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "wrong-result", "group_id": self.group_id, "part_index": self.part_index,
                "recipient": self.recipient,
                "contributions": [dataclasses.astuple(item) for item in self.contributions],
                "result": dataclasses.astuple(self.result)}

    @classmethod
    def from_wire(cls, wire: Any) -> Evidence | None:
        try:
            return cls(bytes(wire["group_id"]), int(wire["part_index"]), str(wire["recipient"]),
                       tuple(SignedTensor(str(a), bytes(b), bytes(c)) for a, b, c in wire["contributions"]),
                       SignedTensor(*(type_(value) for type_, value in zip((str, bytes, bytes), wire["result"]))))
        except (TypeError, KeyError, ValueError):
            return None


def close(first: torch.Tensor, second: torch.Tensor, scale: float, relative_tolerance: float = 1e-5) -> bool:
    """Equal up to float rounding of values of magnitude `scale` (the aggregate and the deltas are
    computed in a different order on each side)."""
    if first.shape != second.shape or not torch.isfinite(first).all():
        return False
    return float((first.double() - second.double()).norm()) <= relative_tolerance * scale + 1e-12


def expected_delta(contributions: Sequence[torch.Tensor], recipient: torch.Tensor, aggregate: Aggregate
                   ) -> torch.Tensor:
    return aggregate(list(contributions)).to(recipient.dtype) - recipient


CONSISTENT = "the signed result follows from the signed contributions"


def judge(evidence: Evidence, aggregate: Aggregate) -> str | None:
    """None when the evidence proves the reducer lied; otherwise why it does not (CONSISTENT when
    the reducer told the truth)."""
    reducer, group_id, part = evidence.reducer, evidence.group_id, evidence.part_index
    if not peer_keys.verify(reducer, result_statement(group_id, reducer, part, evidence.recipient,
                                                      evidence.result.tensor_digest()), evidence.result.signature):
        return "the result is not signed by the accused reducer"
    signers = [item.signer for item in evidence.contributions]
    if len(set(signers)) != len(signers) or evidence.recipient not in signers:
        return "the contributions repeat a sender or leave out the recipient's own"
    for item in evidence.contributions:
        statement = contribution_statement(group_id, reducer, part, item.tensor_digest())
        if not peer_keys.verify(item.signer, statement, item.signature):
            return f"the contribution of {item.signer} is not signed by it"
    tensors = {item.signer: item.decoded() for item in evidence.contributions}
    recipient = tensors[evidence.recipient]
    if not torch.isfinite(recipient).all():
        return "the recipient's own contribution is not finite, so its delta proves nothing"
    try:
        expected = expected_delta(list(tensors.values()), recipient, aggregate)
    except ValueError as error:
        return f"the contributions cannot be aggregated ({error})"
    got = evidence.result.decoded()
    scale = max(float(expected.double().norm()), float(recipient.double().norm()), 1e-30)
    return CONSISTENT if close(got, expected, scale) else None


@dataclasses.dataclass(frozen=True)
class NonFiniteEvidence:
    """That `contribution.signer` signed a part containing NaN or Inf (for `reducer`'s part
    `part_index` of round `group_id`): no honest finite computation sends that. One instance is
    not a verdict (an honest peer can overflow); readers count distinct rounds."""
    group_id: bytes
    reducer: str
    part_index: int
    contribution: SignedTensor

    def to_wire(self) -> dict[str, Any]:
        return {"kind": "nonfinite", "group_id": self.group_id, "reducer": self.reducer,
                "part_index": self.part_index, "contribution": dataclasses.astuple(self.contribution)}

    @classmethod
    def from_wire(cls, wire: Any) -> NonFiniteEvidence | None:
        try:
            signer, tensor, signature = wire["contribution"]
            return cls(bytes(wire["group_id"]), str(wire["reducer"]), int(wire["part_index"]),
                       SignedTensor(str(signer), bytes(tensor), bytes(signature)))
        except (TypeError, KeyError, ValueError):
            return None

    def holds(self) -> bool:
        item = self.contribution
        statement = contribution_statement(self.group_id, self.reducer, self.part_index, item.tensor_digest())
        return peer_keys.verify(item.signer, statement, item.signature) and not bool(torch.isfinite(item.decoded()).all())
