"""Deep prompt tuning through real peers: the loss and every gradient (deep prompts, shallow
prompt, embeddings, head) equal a local transformers model given the same prompts by forward
pre-hooks; training only the deep prompts lowers the loss step for step as locally; a peer lost
between forward and backward is replaced by two peers of other spans, and the gradients hold."""

import signal

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from swarm.local_swarm import LocalSwarm
from swarm.model import DistributedModelForCausalLM
from swarm.retry import RetryPolicy

PROMPT_TOKENS = 3


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


class LocalDeepPrompts:
    """The reference: a whole local model with a shallow prompt in front of the input and
    deep_prompts[i] added to the prompt's positions before layer i (forward pre-hooks)."""

    def __init__(self, folder, prompt: torch.Tensor, deep_prompts: torch.Tensor):
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.prompt = nn.Parameter(prompt.detach().clone())
        self.deep_prompts = nn.Parameter(deep_prompts.detach().clone())
        for index, layer in enumerate(self.model.model.layers):
            layer.register_forward_pre_hook(self._adder(index), with_kwargs=True)

    def _adder(self, index: int):
        def add(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            length = self.deep_prompts.shape[1]
            hidden = torch.cat([hidden[:, :length] + self.deep_prompts[index], hidden[:, length:]], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        return add

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.model.embed_tokens(ids)
        prompt = self.prompt.unsqueeze(0).expand(ids.shape[0], -1, -1)
        logits = self.model(inputs_embeds=torch.cat([prompt, embeddings], dim=1)).logits[:, self.prompt.shape[0]:]
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    with LocalSwarm(str(tiny_llama), cache_dir=cache) as local:
        local.start_bootstrap()
        local.start_peer("0:2")
        local.start_peer("2:4")
        model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), local.initial_peers, cache_dir=cache,
                                                            retry=RetryPolicy(give_up_after=20))
        try:
            local.wait_until_online(model.view)
            yield local, model
        finally:
            model.close()


def prompted(model, tiny_llama, seed: int = 0) -> LocalDeepPrompts:
    """Deep prompt tuning on the swarm model with random (nonzero) deep prompts, and the same
    prompts on a fresh local reference."""
    model.zero_grad(set_to_none=True)
    prompt, deep_prompts = model.enable_prompt_tuning(PROMPT_TOKENS, deep=True, seed=seed)
    with torch.no_grad():
        deep_prompts.copy_(0.3 * torch.randn(deep_prompts.shape, generator=torch.Generator().manual_seed(seed)))
    return LocalDeepPrompts(tiny_llama, prompt, deep_prompts)


def assert_gradients_equal(model, reference: LocalDeepPrompts) -> None:
    assert relative_error(model.deep_prompts.grad, reference.deep_prompts.grad) < 1e-4
    assert relative_error(model.prompt_embeddings.grad, reference.prompt.grad) < 1e-4
    assert relative_error(model.embed_tokens.weight.grad, reference.model.model.embed_tokens.weight.grad) < 1e-4
    assert relative_error(model.lm_head.weight.grad, reference.model.lm_head.weight.grad) < 1e-4


IDS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(5))


def test_loss_and_gradients_equal_a_local_model_with_the_same_prompts(swarm, tiny_llama):
    _, model = swarm
    reference = prompted(model, tiny_llama)
    reference_loss = reference.loss(IDS)
    reference_loss.backward()

    loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert abs(loss.item() - reference_loss.item()) / reference_loss.item() < 1e-5
    assert_gradients_equal(model, reference)
    assert model.deep_prompts.grad[0].abs().sum() > 0 and model.deep_prompts.grad[-1].abs().sum() > 0

    with torch.no_grad():  # the forward without autograd feeds the deep prompts too
        assert abs(model(IDS, labels=IDS).loss.item() - reference_loss.item()) / reference_loss.item() < 1e-5
        model.deep_prompts.zero_()
        assert abs(model(IDS, labels=IDS).loss.item() - reference_loss.item()) > 1e-3  # they made the difference


def test_training_only_the_deep_prompts_lowers_the_loss_as_locally(swarm, tiny_llama):
    _, model = swarm
    reference = prompted(model, tiny_llama, seed=1)
    model.requires_grad_(False)
    model.deep_prompts.requires_grad_(True)  # the shallow prompt stays frozen: the input needs no gradient
    target = torch.tensor([[5, 17, 42, 99] * 3])
    optimizer = torch.optim.Adam([model.deep_prompts], lr=0.05)
    reference_optimizer = torch.optim.Adam([reference.deep_prompts], lr=0.05)
    losses, reference_losses = [], []
    try:
        for _ in range(5):
            optimizer.zero_grad()
            loss = model(target, labels=target).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            reference_optimizer.zero_grad()
            reference_loss = reference.loss(target)
            reference_loss.backward()
            reference_optimizer.step()
            reference_losses.append(reference_loss.item())
    finally:
        model.requires_grad_(True)
    assert model.prompt_embeddings.grad is None
    assert losses[-1] < losses[0] * 0.97, losses
    for got, expected in zip(losses, reference_losses):
        assert abs(got - expected) / expected < 1e-4, (losses, reference_losses)


def test_backward_after_losing_a_peer_splits_the_prompts_over_the_replacements(swarm, tiny_llama):
    local, model = swarm
    reference = prompted(model, tiny_llama, seed=2)
    reference.loss(IDS).backward()
    doomed = local.peers[1]  # blocks 2:4
    loss = model(IDS, labels=IDS).loss  # blocks 2:4 went through `doomed`
    replacements = [local.start_peer("2:3"), local.start_peer("3:4")]
    local.wait_until_online(model.view, replacements)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait()
    loss.backward()  # blocks 2:4 redone as 2:3 then 3:4, each with its slice of the prompts
    assert doomed.peer_id in model.client.retry.avoided()
    assert_gradients_equal(model, reference)
