"""`DistributedModelForCausalLM`: the client half of a model whose blocks live on peers.

The client holds the embeddings, the final norm and the head (tied embeddings stay one
parameter); every transformer block runs on peers, found through the DHT.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from protocol.weights import ModelStore, open_model
from swarm.client import ClientOptions, SwarmClient, SwarmView
from swarm.generation import generate
from swarm.session import InferenceSession, forward_through

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(nn.Module):
    def __init__(self, store: ModelStore, client: SwarmClient, owns_client: bool = True):
        super().__init__()
        self.store, self.client, self._owns_client = store, client, owns_client
        self.config = store.config()
        state = store.client_state()
        self.embed_tokens = nn.Embedding.from_pretrained(state["model.embed_tokens.weight"], freeze=False)
        self.norm = LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        self.norm.weight.data.copy_(state["model.norm.weight"])
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        if "lm_head.weight" in state:
            self.lm_head.weight = nn.Parameter(state["lm_head.weight"])
        else:
            self.lm_head.weight = self.embed_tokens.weight  # tied: one parameter
        try:
            self.generation_config = GenerationConfig.from_pretrained(store.path)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)
        self.view = SwarmView(client, store.identity, store.num_blocks)
        self.active_session: InferenceSession | None = None

    @classmethod
    def from_pretrained(cls, model: str, initial_peers: Sequence[str], cache_dir: str | Path | None = None,
                        **client_options: Any) -> DistributedModelForCausalLM:
        store = open_model(model, cache_dir)
        client = SwarmClient(ClientOptions(initial_peers=tuple(initial_peers), **client_options))
        try:
            return cls(store, client)
        except BaseException:
            client.shutdown()
            raise

    @property
    def num_blocks(self) -> int:
        return self.store.num_blocks

    def tokenizer(self):
        return self.store.tokenizer()

    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        return InferenceSession(self.client, self.view, max_length=max_length, batch_size=batch_size)

    @contextlib.contextmanager
    def _use_session(self, session: InferenceSession | None, max_length: int, batch_size: int):
        if session is not None:
            yield session
            return
        with self.inference_session(max_length=max_length, batch_size=batch_size) as own_session:
            yield own_session

    def logits_from_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states))

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **unused: Any) -> CausalLMOutputWithPast:
        _check_no_padding(attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.client.run(forward_through(self.client, self.view, inputs_embeds.detach()))
        logits = self.logits_from_hidden(hidden_states)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 session: InferenceSession | None = None, **kwargs: Any) -> torch.Tensor:
        _check_no_padding(attention_mask)
        return generate(self, input_ids, session=session, **kwargs)

    def close(self) -> None:
        self.view.close()
        if self._owns_client:
            self.client.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_no_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padded batches are not supported yet: pass sequences of equal length without padding")
