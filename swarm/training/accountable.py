"""An all-reduce whose every message is signed, so that a lying reducer can be proven to lie.

Senders sign each part they send to a reducer; reducers sign each result they send back (see
`swarm.training.evidence`). The signature rides in the `peer_id` field of hivemind's
AveragingData, which its all-reduce leaves unused. Each runner keeps what it received: as a
reducer, the signed contributions to its part (revealed on request, `reveal`); as a sender, the
signed results of every reducer (checked against a reveal by the verifier).
"""

from __future__ import annotations

from typing import AsyncIterator

from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2

from protocol.peer_keys import PeerKey
from swarm.training.allreduce import AggregatingAllReduceRunner
from swarm.training.evidence import SignedTensor, contribution_statement, digest, result_statement


class AccountableAllReduceRunner(AggregatingAllReduceRunner):
    def __init__(self, *, peer_key: PeerKey, lie_as_reducer: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.peer_key, self.lie_as_reducer = peer_key, lie_as_reducer  # the latter: tests and benches only
        self.me = self.peer_id.to_base58()
        self.contributions: dict[int, dict[str, SignedTensor]] = {}  # my part index -> sender -> its signed part
        self.results: dict[tuple[str, int], SignedTensor] = {}  # (reducer, its part index) -> signed result

    @property
    def reducers(self) -> list[tuple[str, int]]:
        """Every other member that reduced something, with how many parts it reduced."""
        return [(peer.to_base58(), parts) for peer, parts in
                zip(self.ordered_peer_ids, self.tensor_part_container.num_parts_by_peer)
                if parts and peer != self.peer_id]

    def senders_heard(self) -> set[str]:
        """Members whose contributions reached us for every one of our parts this round."""
        parts = [set(senders) for senders in self.contributions.values()]
        return set.intersection(*parts) if parts else set()

    def reveal(self, part_index: int) -> list[SignedTensor]:
        return list(self.contributions.get(part_index, {}).values())

    # ---- as a sender: sign what we send, keep what reducers answer

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        reducer = self.ordered_peer_ids[peer_index].to_base58()
        part_index = 0
        async for message in super()._generate_input_for_peer(peer_index):
            statement = contribution_statement(self.group_id, reducer, part_index, digest(message.tensor_part))
            message.peer_id = self.peer_key.sign(statement)
            part_index += 1
            yield message

    async def _communicate_with_peer(self, peer_id: PeerID):
        if peer_id == self.peer_id:  # our own part: our contribution to it is signed like anyone's
            for part_index, part in enumerate(self.parts_for_local_averaging):
                serialized = serialize_torch_tensor(part)
                statement = contribution_statement(self.group_id, self.me, part_index, digest(serialized))
                self.contributions.setdefault(part_index, {})[self.me] = SignedTensor(
                    self.me, serialized.SerializeToString(), self.peer_key.sign(statement))
        return await super()._communicate_with_peer(peer_id)

    def _get_peer_stub(self, peer: PeerID):
        return _RecordingStub(super()._get_peer_stub(peer), self, peer.to_base58())

    # ---- as a reducer: keep signed contributions, sign our answers

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        sender = context.remote_id.to_base58()

        async def recording() -> AsyncIterator[averaging_pb2.AveragingData]:
            part_index = 0
            async for message in stream:
                self.contributions.setdefault(part_index, {})[sender] = SignedTensor(
                    sender, message.tensor_part.SerializeToString(), bytes(message.peer_id))
                part_index += 1
                yield message

        part_index = 0
        async for reply in super().rpc_aggregate_part(recording(), context):
            if reply.code == averaging_pb2.AVERAGED_PART:
                if self.lie_as_reducer:
                    wrong = deserialize_torch_tensor(reply.tensor_part) + 1.0
                    reply = averaging_pb2.AveragingData(code=reply.code, tensor_part=serialize_torch_tensor(wrong))
                statement = result_statement(self.group_id, self.me, part_index, sender, digest(reply.tensor_part))
                reply.peer_id = self.peer_key.sign(statement)
                part_index += 1
            yield reply


class _RecordingStub:
    """A reducer's stub whose answers are also kept, signatures included, for verification."""

    def __init__(self, stub, runner: AccountableAllReduceRunner, reducer: str):
        self._stub, self._runner, self._reducer = stub, runner, reducer

    async def rpc_aggregate_part(self, inputs):
        stream = await self._stub.rpc_aggregate_part(inputs)
        return self._record(stream)

    async def _record(self, stream):
        part_index = 0
        async for message in stream:
            if message.code == averaging_pb2.AVERAGED_PART:
                self._runner.results[(self._reducer, part_index)] = SignedTensor(
                    self._reducer, message.tensor_part.SerializeToString(), bytes(message.peer_id))
                part_index += 1
            yield message
