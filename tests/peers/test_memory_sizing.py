from peers.server import available_memory_bytes, blocks_that_fit
from protocol.weights import open_model


def test_block_count_follows_free_memory(tiny_llama, tmp_path):
    store = open_model(str(tiny_llama), tmp_path)
    per_block = store.block_bytes(0)
    assert blocks_that_fit(store, available_bytes=10**12) == store.num_blocks
    assert blocks_that_fit(store, available_bytes=int(per_block * 2 * 2.5)) == 2  # half of it holds 2.5 blocks
    assert blocks_that_fit(store, available_bytes=1) == 1  # always at least one
    assert available_memory_bytes() > 0
