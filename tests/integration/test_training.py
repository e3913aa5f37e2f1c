"""Training through the swarm: loss and gradients equal the local model's, soft prompts learn,
and a peer lost between forward and backward is routed around."""

import signal

import torch
from transformers import AutoModelForCausalLM

from swarm.local_swarm import LocalSwarm
from swarm.model import DistributedModelForCausalLM
from swarm.retry import RetryPolicy
from tests.conftest import EMBEDDED, RunningSwarm, chat_ids


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_loss_and_gradients_through_two_peers_equal_local(cache_dir, reference):
    local_model, tokenizer = reference
    ids = torch.cat([chat_ids(tokenizer, "What is the capital of France?")[:, :24],
                     chat_ids(tokenizer, "Write a short poem about the sea.")[:, :24]])
    local_model.zero_grad()
    local_loss = local_model(ids, labels=ids).loss
    local_loss.backward()
    running = RunningSwarm(EMBEDDED, ["0:15", "15:30"], cache_dir)
    try:
        model = running.model
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert abs(loss.item() - local_loss.item()) / local_loss.item() < 1e-5
        assert model.lm_head.weight is model.embed_tokens.weight  # tied: one parameter, one gradient
        assert relative_error(model.embed_tokens.weight.grad, local_model.model.embed_tokens.weight.grad) < 1e-4
        assert relative_error(model.norm.weight.grad, local_model.model.norm.weight.grad) < 1e-4

        prompt = model.enable_prompt_tuning(4)
        optimizer = torch.optim.Adam([prompt], lr=0.05)
        target = tokenizer("Answer: Paris. Answer: Paris.", return_tensors="pt")["input_ids"]
        losses = []
        for _ in range(6):
            optimizer.zero_grad()
            step_loss = model(target, labels=target).loss
            step_loss.backward()
            assert prompt.grad is not None and prompt.grad.abs().sum() > 0
            optimizer.step()
            losses.append(step_loss.item())
        assert losses[-1] < losses[0] * 0.8, losses
    finally:
        local_model.zero_grad()
        running.close()


def test_backward_survives_a_peer_lost_after_forward(tiny_llama, tmp_path):
    cache = str(tmp_path / "cache")
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    reference_loss = reference(ids, labels=ids).loss
    reference_loss.backward()
    with LocalSwarm(str(tiny_llama), cache_dir=cache) as local:
        local.start_bootstrap()
        local.start_peer("0:2")
        doomed = local.start_peer("2:4")
        model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), local.initial_peers, cache_dir=cache,
                                                            retry=RetryPolicy(give_up_after=20))
        try:
            local.wait_until_online(model.view)
            loss = model(ids, labels=ids).loss  # the forward went through `doomed` for blocks 2:4
            spare = local.start_peer("2:4")
            local.wait_until_online(model.view, [spare])
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait()
            loss.backward()
            assert abs(loss.item() - reference_loss.item()) < 1e-5
            assert relative_error(model.embed_tokens.weight.grad, reference.model.embed_tokens.weight.grad) < 1e-4
            assert doomed.peer_id in model.client.retry.avoided()
        finally:
            model.close()
