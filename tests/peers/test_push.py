"""PushHub on its own, over a stand-in for hivemind's P2P that records what each stream carries:
the pushes of a batch's sessions leave as one message per next peer."""

import asyncio

import torch
from hivemind.p2p import PeerID

from peers.push import PushHub
from protocol.messages import FrameJoiner, Pushes, Step

PEER_B = "QmNTGh8mqtFCB7SSnNQtrZrx7Yp8eDzW6XKH7yxtkdi5GP"
PEER_C = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


class RecordingP2P:
    def __init__(self, unreachable: tuple[str, ...] = ()):
        self.unreachable = {PeerID.from_base58(peer) for peer in unreachable}
        self.opened: list[PeerID] = []
        self.messages: list[tuple[PeerID, Pushes]] = []

    async def iterate_protobuf_handler(self, peer_id, name, requests, response_type):
        if peer_id in self.unreachable:
            raise ConnectionError("no route to peer")
        self.opened.append(peer_id)
        asyncio.get_running_loop().create_task(self._read(peer_id, requests))

        async def no_replies():
            await asyncio.Event().wait()
            yield

        return no_replies()

    async def _read(self, peer_id, requests):
        joiner = FrameJoiner(2**26)
        async for request in requests:
            message = joiner.push(request.metadata)
            if message is not None:
                self.messages.append((peer_id, message))


def step(index: int) -> Step:
    return Step(step_id=index, position=index, hidden_states=torch.full((1, 1, 4), float(index)))


def test_a_batch_of_pushes_to_one_peer_is_one_message_and_streams_are_reused():
    p2p = RecordingP2P()

    async def main():
        hub = PushHub(p2p)
        first = await asyncio.gather(*(hub.push(step(index), [[PEER_B, f"s{index}"], [PEER_C, f"t{index}"]])
                                       for index in range(4)))
        second = await asyncio.gather(hub.push(step(10), [[PEER_B, "s0"]]), hub.push(step(11), [[PEER_C, "u"]]))
        await asyncio.sleep(0.01)  # the streams' readers take what was written
        hub.close()
        return first, second

    first, second = asyncio.run(main())
    assert first == [None] * 4 and second == [None, None]
    assert [len(message.steps) for _, message in p2p.messages] == [4, 1, 1]
    peer, batch = p2p.messages[0]
    assert peer == PeerID.from_base58(PEER_B)
    assert [(s.step_id, s.session_id, s.push_to) for s in batch.steps] == \
        [(index, f"s{index}", [[PEER_C, f"t{index}"]]) for index in range(4)]
    assert torch.equal(batch.steps[2].hidden_states, torch.full((1, 1, 4), 2.0))
    assert p2p.messages[1][1].steps[0].push_to is None  # the last hop pushes no further
    assert p2p.opened == [PeerID.from_base58(PEER_B), PeerID.from_base58(PEER_C)]  # one stream per next peer


def test_an_unreachable_peer_fails_only_its_own_pushes():
    p2p = RecordingP2P(unreachable=(PEER_C,))

    async def main():
        hub = PushHub(p2p)
        results = await asyncio.gather(hub.push(step(1), [[PEER_B, "s1"]]), hub.push(step(2), [[PEER_C, "s2"]]),
                                       hub.push(step(3), [[PEER_B, "s3"]]))
        await asyncio.sleep(0.01)
        hub.close()
        return results

    sent_b1, sent_c, sent_b3 = asyncio.run(main())
    assert sent_b1 is None and sent_b3 is None
    assert sent_c.startswith(f"could not reach {PEER_C}") and "no route to peer" in sent_c
    assert [[s.session_id for s in message.steps] for _, message in p2p.messages] == [["s1", "s3"]]


def test_a_peer_without_p2p_says_it_does_not_push():
    assert asyncio.run(PushHub(None).push(step(1), [[PEER_B, "s"]])) == "this peer does not push"
