"""Each supported model family and source format through a real 2-peer swarm, exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from protocol.weights import resolve_model
from tests.conftest import EMBEDDED, RunningSwarm, chat_ids, make_tiny_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tiny_family_is_exact_through_two_peers(family, tmp_path):
    folder = make_tiny_model(tmp_path / f"tiny-{family}", family=family, seed=1)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(2))
    running = RunningSwarm(str(folder), ["0:2", "2:4"], str(tmp_path / "cache"))
    try:
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            expected_logits = reference(ids).logits
        assert running.model.generate(ids, max_new_tokens=12, min_new_tokens=12).tolist() == expected.tolist()
        logits = running.model(ids).logits
        assert (logits - expected_logits).abs().max() / expected_logits.abs().max() < 1e-4
    finally:
        running.close()


def test_a_gguf_file_path_is_a_model(cache_dir, reference):
    model, tokenizer = reference
    gguf = str(resolve_model(EMBEDDED).path)
    running = RunningSwarm(gguf, ["0:30"], cache_dir)
    try:
        ids = chat_ids(tokenizer, "What is the capital of France?")
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert running.model.generate(ids, max_new_tokens=10).tolist() == expected.tolist()
        assert running.model.store.identity.name == "smollm2-135m-instruct.q4_1"
    finally:
        running.close()
