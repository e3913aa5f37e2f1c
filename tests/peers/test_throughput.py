import json
from concurrent.futures import ThreadPoolExecutor

import peers.throughput as throughput
from peers.blocks import BlockSpan
from peers.service import BlockService, ServingLimits
from protocol.weights import open_model


def test_compute_speed_is_measured_once_per_device_and_model(tiny_llama, tmp_path, monkeypatch):
    store = open_model(str(tiny_llama), tmp_path / "cache")
    service = BlockService(store.identity, BlockSpan(store, 0, 4), ServingLimits(), ThreadPoolExecutor(1))
    cache_file = tmp_path / "throughput.json"
    first = throughput.span_throughput(service, cache_file, store.identity.fingerprint)
    assert first > 0 and list(json.loads(cache_file.read_text())) == [throughput.device_key(store.identity.fingerprint)]

    def must_not_measure(*args):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(throughput, "measure_seconds_per_block", must_not_measure)
    assert throughput.span_throughput(service, cache_file, store.identity.fingerprint) == first
    half = BlockService(store.identity, BlockSpan(store, 0, 2), ServingLimits(), ThreadPoolExecutor(1))
    assert abs(throughput.span_throughput(half, cache_file, store.identity.fingerprint) - 2 * first) < 1e-6 * first
