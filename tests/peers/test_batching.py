"""StepBatcher on its own (a stand-in for the blocks records what runs together): steps of
generating sessions wait for each other's next steps only when those are due soon."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from peers.batching import StepBatcher


class RecordingBlocks:
    def __init__(self):
        self.batches: list[int] = []  # sessions per computation, in order

    def forward_many(self, steps, start, end):
        self.batches.append(len(steps))
        return [hidden_states + 1 for hidden_states, _, _ in steps]


class Session:  # stands for an attention cache: the batcher only needs its identity
    pass


def run_rounds(window: float, lag: float, rounds: int = 5, forget_b: bool = False, b_start: int = 0
               ) -> tuple[list[int], list[str]]:
    """Sessions A and B step together `rounds` times, B `lag` seconds after A each time; A goes
    through blocks 0:2, B through b_start:2."""
    blocks, events = RecordingBlocks(), []

    async def main():
        with ThreadPoolExecutor(1) as compute:
            batcher = StepBatcher(blocks, compute, after_compute=lambda: None, gather_window=window)
            a, b = Session(), Session()

            async def step(name, cache, delay):
                await asyncio.sleep(delay)
                events.append(f"{name} sent")
                output = await batcher.submit(torch.zeros(1, 1, 4), b_start if name == "B" else 0, 2, 0, cache)
                assert torch.equal(output, torch.ones(1, 1, 4))
                events.append(f"{name} done")

            for index in range(rounds):
                if forget_b and index == rounds - 1:
                    batcher.forget(b)  # B's session closed: A's last step must not wait for it
                    await step("A", a, 0.0)
                else:
                    await asyncio.gather(step("A", a, 0.0), step("B", b, lag))
                await asyncio.sleep(0.05)

    asyncio.run(main())
    return blocks.batches, events


def test_a_step_waits_for_a_session_due_within_the_window():
    batches, _ = run_rounds(window=0.5, lag=0.1)
    assert batches[:2] == [1, 1]  # nothing known of either session's rhythm yet: nothing to wait for
    assert batches[2:] == [2, 2, 2, 2], batches  # then B is due within the window: one batch each round


def test_no_wait_without_a_window_for_a_closed_session_or_one_due_later():
    assert run_rounds(window=0.0, lag=0.1)[0] == [1] * 10
    batches, events = run_rounds(window=0.5, lag=0.1, forget_b=True)
    assert batches == [1, 1, 2, 2, 2, 1], batches
    batches, events = run_rounds(window=0.05, lag=0.2)  # B's steps come later than the window reaches
    assert batches == [1] * 10, batches
    assert events[-4:] == ["A sent", "A done", "B sent", "B done"]


def test_no_wait_for_a_session_over_other_blocks():
    """Steps over other blocks never share a batch: waiting for them would only delay."""
    batches, events = run_rounds(window=0.5, lag=0.1, b_start=1)
    assert batches == [1] * 10, batches
    assert events[-4:] == ["A sent", "A done", "B sent", "B done"]


def test_the_gap_after_a_prompt_does_not_count_as_a_sessions_rhythm():
    """Each session's prompt, then a long pause (its prefill on the rest of the route), then
    generation steps: batching starts as soon as two generation steps showed A's rhythm, at which
    B is expected too. Taken as a rhythm, the pause would make the sessions look far off for
    several more rounds."""
    blocks = RecordingBlocks()

    async def main():
        with ThreadPoolExecutor(1) as compute:
            batcher = StepBatcher(blocks, compute, after_compute=lambda: None, gather_window=0.3)
            a, b = Session(), Session()

            async def step(cache, delay, tokens=1):
                await asyncio.sleep(delay)
                await batcher.submit(torch.zeros(1, tokens, 4), 0, 2, 0, cache)

            await asyncio.gather(step(a, 0.0, tokens=5), step(b, 0.1, tokens=5))
            await asyncio.sleep(0.6)  # under active_for: the sessions are still taken to be generating
            for _ in range(5):
                await asyncio.gather(step(a, 0.0), step(b, 0.1))
                await asyncio.sleep(0.05)

    asyncio.run(main())
    assert blocks.batches == [1, 1, 1, 1, 2, 2, 2, 2], blocks.batches


def test_new_sessions_batch_at_the_rhythm_of_earlier_ones():
    """A and B generate together, then close; C and D send their prompts and start generating
    over the same blocks. Their first generation steps already run as one batch, at the rhythm
    A and B showed (for sessions that start together, as the clients of bench/concurrency.py)."""
    blocks = RecordingBlocks()

    async def main():
        with ThreadPoolExecutor(1) as compute:
            batcher = StepBatcher(blocks, compute, after_compute=lambda: None, gather_window=0.5)

            async def step(cache, delay, tokens=1):
                await asyncio.sleep(delay)
                await batcher.submit(torch.zeros(1, tokens, 4), 0, 2, 0, cache)

            a, b, c, d = Session(), Session(), Session(), Session()
            for _ in range(5):
                await asyncio.gather(step(a, 0.0), step(b, 0.1))
                await asyncio.sleep(0.05)
            batcher.forget(a)
            batcher.forget(b)
            await asyncio.gather(step(c, 0.0, tokens=5), step(d, 0.1, tokens=5))
            await asyncio.sleep(0.05)
            for _ in range(5):
                await asyncio.gather(step(c, 0.0), step(d, 0.1))
                await asyncio.sleep(0.05)

    asyncio.run(main())
    assert blocks.batches[:6] == [1, 1, 2, 2, 2, 2], blocks.batches  # A and B
    assert blocks.batches[6:] == [1, 1, 2, 2, 2, 2, 2], blocks.batches  # C's and D's prompts, then batches
