import random
import time

import pytest
import torch

from swarm.cli import build_parser
from swarm.client import ClientOptions
from swarm.retry import RetryPolicy
from swarm.verification import LOCAL, Opinion, first_mismatch, position_errors, settle, should_check

TOLERANCE = 1e-4


def hidden(seed: int = 0, positions: int = 5) -> torch.Tensor:
    return torch.randn(2, positions, 16, generator=torch.Generator().manual_seed(seed))


def wrong_from(states: torch.Tensor, position: int) -> torch.Tensor:
    lie = states.clone()
    lie[1, position:] += 0.5  # the second sequence of the batch only: any sequence counts
    return lie


def test_first_step_always_checked_then_the_fraction():
    rng = random.Random(0)
    assert should_check(False, 0.01, rng)
    assert not any(should_check(False, 0.0, rng) for _ in range(100))  # 0: verification off
    assert all(should_check(True, 1.0, rng) for _ in range(100))
    share = sum(should_check(True, 0.25, rng) for _ in range(4000)) / 4000
    assert 0.22 < share < 0.28


def test_rounding_agrees_and_a_lie_is_found_at_its_first_position():
    truth = hidden()
    rounded = truth * (1 + 1e-6)
    assert first_mismatch(rounded, truth, TOLERANCE) is None
    assert first_mismatch(wrong_from(truth, 3), truth, TOLERANCE) == 3
    assert first_mismatch(truth[:, :4], truth, TOLERANCE) == 0  # wrong shape: wrong from the start
    nan = truth.clone()
    nan[0, 2, 0] = float("nan")
    assert first_mismatch(nan, truth, TOLERANCE) == 2
    assert position_errors(rounded, truth).shape == (5,)


def test_agreement_with_the_first_referee_settles():
    truth = hidden()
    verdict = settle([Opinion(("p",), truth), Opinion(("r",), truth.clone())], TOLERANCE)
    assert verdict.first_mismatch is None and verdict.liars == frozenset()


def test_a_lone_disagreement_is_undecided():
    truth = hidden()
    assert settle([Opinion(("p",), wrong_from(truth, 0)), Opinion(("r",), truth)], TOLERANCE) is None
    assert settle([Opinion(("p",), truth)], TOLERANCE) is None


def test_a_third_peer_breaks_the_tie_against_the_checked_peer():
    truth = hidden()
    opinions = [Opinion(("p",), wrong_from(truth, 2)), Opinion(("r",), truth), Opinion(("t",), truth.clone())]
    verdict = settle(opinions, TOLERANCE)
    assert verdict.liars == {"p"} and verdict.first_mismatch == 2


def test_a_third_peer_breaks_the_tie_against_the_referee():
    truth = hidden()
    opinions = [Opinion(("p",), truth), Opinion(("r",), wrong_from(truth, 0)), Opinion(("t",), truth.clone())]
    verdict = settle(opinions, TOLERANCE)
    assert verdict.liars == {"r"} and verdict.first_mismatch is None


def test_the_clients_own_recomputation_is_the_truth():
    truth = hidden()
    opinions = [Opinion(("p",), wrong_from(truth, 4)), Opinion(("r",), truth), Opinion(LOCAL, truth.clone())]
    verdict = settle(opinions, TOLERANCE)
    assert verdict.truth.voters == LOCAL and verdict.liars == {"p"} and verdict.first_mismatch == 4
    # two liars telling different lies, then the client: both are caught
    opinions = [Opinion(("p",), wrong_from(truth, 1)), Opinion(("r",), wrong_from(truth, 0) * 2),
                Opinion(LOCAL, truth)]
    assert settle(opinions, TOLERANCE).liars == {"p", "r"}


def test_a_referee_route_of_several_peers_is_not_blamed():
    truth = hidden()
    opinions = [Opinion(("p",), truth), Opinion(("a", "b"), wrong_from(truth, 0)), Opinion(LOCAL, truth.clone())]
    verdict = settle(opinions, TOLERANCE)
    assert verdict.liars == frozenset() and verdict.first_mismatch is None


def test_a_ban_outlasts_later_avoids():
    policy = RetryPolicy(avoid_seconds=0.01, ban_seconds=60)
    policy.ban("liar")
    policy.avoid("liar")  # a failover after the ban must not shorten it
    policy.avoid("slow")
    time.sleep(0.02)
    assert policy.avoided() == {"liar"}


def test_the_fraction_is_checked_where_it_is_given():
    with pytest.raises(ValueError, match="verify_fraction"):
        ClientOptions(initial_peers=("/ip4/127.0.0.1/tcp/1",), verify_fraction=1.5)
    assert build_parser().parse_args(["generate", "m", "hi", "--verify", "0.25"]).verify == 0.25
