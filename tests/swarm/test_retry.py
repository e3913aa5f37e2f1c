import time

from swarm.retry import RetryPolicy


def test_avoided_peers_expire():
    policy = RetryPolicy(avoid_seconds=0.05)
    policy.avoid("a")
    assert policy.avoided() == {"a"}
    time.sleep(0.06)
    assert policy.avoided() == frozenset()


def test_delays_back_off_and_stop():
    delays = list(RetryPolicy(first_delay=0.01, max_delay=0.04, give_up_after=0.2).delays())
    assert delays[:3] == [0.01, 0.02, 0.04] and max(delays) == 0.04
    assert sum(delays) <= 0.2
