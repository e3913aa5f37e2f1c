"""Several clients generating at once through the same peers: each gets the exact answer
(the peers batch their steps together)."""

import threading

import torch

from tests.conftest import EMBEDDED, PROMPTS, RunningSwarm, chat_ids

PROMPTS_4 = [*PROMPTS, "Name three colors of the rainbow."]


def test_four_concurrent_clients_get_exact_outputs(cache_dir, reference):
    model, tokenizer = reference
    inputs = [chat_ids(tokenizer, prompt) for prompt in PROMPTS_4]
    with torch.no_grad():
        expected = [model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False) for ids in inputs]
    running = RunningSwarm(EMBEDDED, ["0:10", "10:20", "20:30"], cache_dir)
    try:
        outputs: dict[int, object] = {}
        start = threading.Barrier(len(inputs))

        def client(index: int) -> None:
            try:
                start.wait()
                outputs[index] = running.model.generate(inputs[index], max_new_tokens=24, min_new_tokens=24)
            except Exception as error:  # reported by the assertion below
                outputs[index] = error

        threads = [threading.Thread(target=client, args=(index,)) for index in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        for index, want in enumerate(expected):
            got = outputs[index]
            assert not isinstance(got, Exception), got
            assert got.tolist() == want.tolist(), (index, tokenizer.decode(got[0, inputs[index].shape[1]:]))
        logs = "".join(child.log_path.read_text() for child in running.local.peers)
    finally:
        running.close()
    assert "batched" in logs  # the peers did run steps of several sessions together
