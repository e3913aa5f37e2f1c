"""The block span against the whole transformers model it came from: same numbers."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from peers.blocks import BlockSpan, add_prompt
from protocol.weights import open_model


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    store = open_model(str(tiny_llama), tmp_path_factory.mktemp("cache"))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return store, reference


def logits_through(reference, hidden):
    return reference.lm_head(reference.model.norm(hidden))


def test_full_forward_matches_transformers(tiny):
    store, reference = tiny
    ids = torch.randint(3, 300, (2, 11))
    blocks = BlockSpan(store, 0, store.num_blocks)
    hidden = blocks(reference.model.embed_tokens(ids).detach(), 0, store.num_blocks)
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(logits_through(reference, hidden), expected, rtol=1e-5, atol=1e-5)


def test_two_spans_chained_equal_one(tiny):
    store, reference = tiny
    embeddings = reference.model.embed_tokens(torch.randint(3, 300, (1, 9))).detach()
    whole = BlockSpan(store, 0, 4)(embeddings, 0, 4)
    first, second = BlockSpan(store, 0, 2), BlockSpan(store, 2, 4)
    torch.testing.assert_close(second(first(embeddings, 0, 2), 2, 4), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[:, :, :], BlockSpan(store, 0, 4)(embeddings, 0, 4))
    assert len(first.layers) == 2  # only the blocks asked for are loaded


def test_cached_steps_equal_full_forward_including_multi_token_steps_and_rollback(tiny):
    store, reference = tiny
    blocks = BlockSpan(store, 0, 4)
    embeddings = reference.model.embed_tokens(torch.randint(3, 300, (1, 12))).detach()
    full = blocks(embeddings, 0, 4)
    cache = blocks.new_cache(0, 4, 1, 16)
    pieces = [blocks(embeddings[:, :5], 0, 4, 0, cache)]  # prefill
    pieces += [blocks(embeddings[:, 5:6], 0, 4, 5, cache)]  # one token
    pieces += [blocks(embeddings[:, 6:9], 0, 4, 6, cache)]  # several tokens after a prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full[:, :9], rtol=1e-5, atol=1e-5)
    blocks(torch.randn(1, 2, 64), 0, 4, 9, cache)  # junk at 9..10, then roll back to 9
    rest = blocks(embeddings[:, 9:12], 0, 4, 9, cache)
    torch.testing.assert_close(rest, full[:, 9:12], rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_sub_span_of_a_loaded_span(tiny):
    store, reference = tiny
    blocks = BlockSpan(store, 0, 4)
    embeddings = reference.model.embed_tokens(torch.randint(3, 300, (1, 6))).detach()
    torch.testing.assert_close(blocks(blocks(embeddings, 0, 1), 1, 4), blocks(embeddings, 0, 4))


def test_out_of_range_spans_are_refused(tiny):
    store, _ = tiny
    with pytest.raises(ValueError, match="out of range"):
        BlockSpan(store, 2, 9)
    cache = BlockSpan(store, 0, 1).new_cache(0, 1, 1, 4)
    with pytest.raises(ValueError, match="max_length"):
        cache.begin_step(0, 5)
    with pytest.raises(ValueError, match="holds 0"):
        cache.begin_step(1, 1)


def test_sessions_batched_together_equal_each_alone(tiny):
    store, reference = tiny
    blocks = BlockSpan(store, 0, 4)
    prompts = [reference.model.embed_tokens(torch.randint(3, 300, (batch, length))).detach()
               for batch, length in ((1, 5), (2, 3), (1, 7))]
    alone = []
    for prompt in prompts:  # prefill, one token, then 3 tokens at once after a cached prefix (masked)
        cache = blocks.new_cache(0, 4, prompt.shape[0], 16)
        alone.append((blocks(prompt, 0, 4, 0, cache), blocks(prompt[:, -1:], 0, 4, prompt.shape[1], cache),
                      blocks(prompt[:, :3], 0, 4, prompt.shape[1] + 1, cache)))
    caches = [blocks.new_cache(0, 4, prompt.shape[0], 16) for prompt in prompts]
    prefill = blocks.forward_many([(prompt, 0, cache) for prompt, cache in zip(prompts, caches)], 0, 4)
    decode = blocks.forward_many([(prompt[:, -1:], prompt.shape[1], cache) for prompt, cache in zip(prompts, caches)],
                                 0, 4)
    several = blocks.forward_many([(prompt[:, :3], prompt.shape[1] + 1, cache)
                                   for prompt, cache in zip(prompts, caches)], 0, 4)
    for expected, *got in zip(alone, prefill, decode, several):
        for expected_output, got_output in zip(expected, got):
            torch.testing.assert_close(got_output, expected_output, rtol=1e-5, atol=1e-5)


def test_backward_gives_the_input_gradient_of_the_layers(tiny):
    store, reference = tiny
    blocks = BlockSpan(store, 1, 3)
    inputs = torch.randn(2, 5, 64, requires_grad=True)
    hidden, positions = inputs, torch.arange(5).unsqueeze(0).expand(2, -1)
    rotary = reference.model.rotary_emb(hidden, positions)
    for layer in reference.model.layers[1:3]:
        hidden = layer(hidden, position_ids=positions, position_embeddings=rotary)
    grad_outputs = torch.randn(2, 5, 64)
    (expected,) = torch.autograd.grad(hidden, inputs, grad_outputs)
    grad_inputs, grad_prompts = blocks.backward(inputs.detach(), grad_outputs, 1, 3)
    torch.testing.assert_close(grad_inputs, expected, rtol=1e-5, atol=1e-6)
    assert grad_prompts is None


def layers_with_deep_prompts(reference, hidden, prompts, first):
    """The reference layers first.. with prompts[i] added to the first positions before layer first+i."""
    positions = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    rotary = reference.model.rotary_emb(hidden, positions)
    for index, prompt in enumerate(prompts):
        hidden = torch.cat([hidden[:, : prompt.shape[0]] + prompt, hidden[:, prompt.shape[0] :]], dim=1)
        hidden = reference.model.layers[first + index](hidden, position_ids=positions, position_embeddings=rotary)
    return hidden


def test_add_prompt_touches_only_the_first_positions_and_leaves_the_input():
    hidden, prompt = torch.zeros(2, 5, 3), torch.ones(2, 3)
    added = add_prompt(hidden, prompt)
    assert added[:, :2].eq(1).all() and added[:, 2:].eq(0).all() and hidden.eq(0).all()


def test_deep_prompts_forward_and_gradients_equal_the_reference_layers(tiny):
    store, reference = tiny
    blocks = BlockSpan(store, 0, 4)
    inputs = torch.randn(2, 6, 64, requires_grad=True)
    prompts = (0.5 * torch.randn(2, 3, 64)).requires_grad_(True)  # for blocks 1:3, 3 prompt tokens
    expected = layers_with_deep_prompts(reference, inputs, prompts, 1)
    grad_outputs = torch.randn(2, 6, 64)
    expected_inputs, expected_prompts = torch.autograd.grad(expected, (inputs, prompts), grad_outputs)

    output = blocks(inputs.detach(), 1, 3, prompts=prompts.detach())
    torch.testing.assert_close(output, expected.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(output, blocks(inputs.detach(), 1, 3), atol=1e-3)  # the prompts do change the output
    grad_inputs, grad_prompts = blocks.backward(inputs.detach(), grad_outputs, 1, 3, prompts.detach())
    torch.testing.assert_close(grad_inputs, expected_inputs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_prompts, expected_prompts, rtol=1e-5, atol=1e-6)


def test_deep_prompts_are_refused_on_cached_steps(tiny):
    store, _ = tiny
    blocks = BlockSpan(store, 0, 1)
    with pytest.raises(ValueError, match="without a cache"):
        blocks(torch.randn(1, 2, 64), 0, 1, 0, blocks.new_cache(0, 1, 1, 4), prompts=torch.zeros(1, 1, 64))
