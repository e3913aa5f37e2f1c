"""A hop's history for replays: appended per step, cut back on rollbacks, joined for a replay."""

import torch

from swarm.session import _History


def steps(count: int, start: int = 0) -> list[torch.Tensor]:
    return [torch.full((1, 1, 4), float(start + index)) for index in range(count)]


def test_appending_steps_keeps_every_position_in_order():
    history = _History()
    history.append(torch.arange(12, dtype=torch.float32).reshape(1, 3, 4) - 100)  # a 3-token prompt
    for part in steps(5):
        history.append(part)
    assert history.length == 8
    joined = history.joined()
    assert joined.shape == (1, 8, 4)
    assert torch.equal(joined[:, 3:, 0], torch.arange(5, dtype=torch.float32).unsqueeze(0))
    assert history.joined() is joined  # joined once, then kept as one piece


def test_cut_keeps_the_first_positions_and_ignores_longer_lengths():
    history = _History()
    for part in steps(6):
        history.append(part)
    history.cut(10)
    assert history.length == 6
    history.cut(4)
    assert history.length == 4 and torch.equal(history.joined()[0, :, 0], torch.arange(4, dtype=torch.float32))
    history.append(torch.full((1, 1, 4), 40.0))  # a rewritten position 4
    assert torch.equal(history.joined()[0, :, 0], torch.tensor([0.0, 1, 2, 3, 40]))
    history.cut(0)
    assert history.length == 0
    history.append(torch.zeros(1, 2, 4))
    assert history.length == 2 and history.joined().shape == (1, 2, 4)
