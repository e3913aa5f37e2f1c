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

from protocol.packed_linear import PackedWeightCache, packing_available
from protocol.weights import ModelStore, open_model
from swarm.client import ClientOptions, SwarmClient, SwarmView
from swarm.generation import generate
from swarm.greedy_head import ScreenedArgmax
from swarm.referees import Verifier
from swarm.remote import RemoteBlocks, forward_through
from swarm.session import InferenceSession

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(nn.Module):
    def __init__(self, store: ModelStore, client: SwarmClient, owns_client: bool = True):
        super().__init__()
        self.store, self.client, self._owns_client = store, client, owns_client
        self.config = store.config()
        state = store.client_state()
        # Without oneDNN (no packed copies, see logits_from_hidden) the head's weight is stored
        # column-major: the product with one hidden state then reads it contiguously, 3.9 instead of
        # 6.7 ms for the embedded model's 49152 x 576 head on the machine that measured it. With
        # oneDNN it stays row-major: greedy steps read a few of its rows (swarm.greedy_head).
        if not packing_available():
            head = "lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"
            state[head] = state[head].t().contiguous().t()
        # padding_idx as in transformers: that row gets no gradient from the lookup
        self.embed_tokens = nn.Embedding.from_pretrained(state["model.embed_tokens.weight"], freeze=False,
                                                         padding_idx=getattr(self.config, "pad_token_id", None))
        self.norm = LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        self.norm.weight.data.copy_(state["model.norm.weight"])
        with torch.device("meta"):  # no throwaway random weight: the real one is assigned below
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
        # checks peers' answers in inference sessions when ClientOptions.verify_fraction > 0
        self.verifier = Verifier(client, self.view, store) if client.options.verify_fraction > 0 else None
        self._packed_head = PackedWeightCache()
        self._greedy_head = ScreenedArgmax()
        self.prompt_embeddings: nn.Parameter | None = None  # shallow soft prompt, see enable_prompt_tuning
        self.deep_prompts: nn.Parameter | None = None  # [num_blocks, prompt tokens, hidden], fed to the peers

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
        return InferenceSession(self.client, self.view, max_length=max_length, batch_size=batch_size,
                                verifier=self.verifier)

    @contextlib.contextmanager
    def _use_session(self, session: InferenceSession | None, max_length: int, batch_size: int):
        if session is not None:
            yield session
            return
        with self.inference_session(max_length=max_length, batch_size=batch_size) as own_session:
            yield own_session

    def logits_from_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden_states)
        # generation (no autograd): a packed copy of the head, 5.0 instead of 6.5 ms per token for
        # the embedded model's head on one thread here (protocol.packed_linear)
        logits = self._packed_head.linear(normed, self.lm_head.weight)
        return self.lm_head(normed) if logits is None else logits

    def greedy_tokens(self, hidden_states: torch.Tensor, banned: list[int] = ()) -> torch.Tensor | None:
        """The argmax of `logits_from_hidden(hidden_states)` per row ([rows, hidden]), never a
        `banned` token, from an int8 screen of the head and float32 logits of the few tokens
        it leaves (swarm.greedy_head); None where the screen cannot be used."""
        return self._greedy_head.argmax(self.norm(hidden_states), self.lm_head.weight, banned)

    def enable_prompt_tuning(self, num_tokens: int, seed: int = 0, deep: bool = False
                             ) -> nn.Parameter | list[nn.Parameter]:
        """A trainable soft prompt of `num_tokens` positions put before every input (shallow
        prompt tuning); initialised from the embeddings of random tokens. Train it like any
        parameter: the gradient comes back through the peers. Returns that parameter.

        `deep=True` adds deep prompts (`deep_prompts`, [num_blocks, num_tokens, hidden], zeros at
        first so the model starts as with the shallow prompt alone): before block i, the peer
        serving it adds deep_prompts[i] to the soft prompt's positions (as Petals' deep_ptune).
        Returns both parameters then: [prompt_embeddings, deep_prompts]."""
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.config.vocab_size, (num_tokens,), generator=generator)
        self.prompt_embeddings = nn.Parameter(self.embed_tokens.weight[tokens].detach().clone())
        self.deep_prompts = None
        if not deep:
            return self.prompt_embeddings
        self.deep_prompts = nn.Parameter(torch.zeros(self.num_blocks, num_tokens, self.config.hidden_size,
                                                     dtype=self.prompt_embeddings.dtype))
        return [self.prompt_embeddings, self.deep_prompts]

    def embed(self, input_ids: torch.Tensor, at_start: bool = True) -> torch.Tensor:
        """Input embeddings, with the soft prompt in front when the sequence starts here."""
        embeddings = self.embed_tokens(input_ids)
        if self.prompt_embeddings is None or not at_start:
            return embeddings
        prompts = self.prompt_embeddings.unsqueeze(0).expand(embeddings.shape[0], -1, -1)
        return torch.cat([prompts.to(embeddings.dtype), embeddings], dim=1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **unused: Any) -> CausalLMOutputWithPast:
        """HF semantics: logits for every input position, and the shifted cross-entropy loss when
        labels are given (-100 is ignored). Differentiable: `loss.backward()` flows through the
        peers into the embeddings, the head, the norm and the soft prompts (shallow and deep)."""
        _check_no_padding(attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        prompt_length = self.prompt_embeddings.shape[0] if self.prompt_embeddings is not None else 0
        deep = self.deep_prompts
        if deep is not None and deep.shape[1] > inputs_embeds.shape[1]:
            raise ValueError(f"{deep.shape[1]} deep prompt tokens need at least as many input positions, "
                             f"got {inputs_embeds.shape[1]}")
        if torch.is_grad_enabled() and (inputs_embeds.requires_grad or (deep is not None and deep.requires_grad)):
            hidden_states = RemoteBlocks.apply(inputs_embeds, deep, self)
        else:
            hidden_states = self.client.run(forward_through(self.client, self.view, inputs_embeds.detach(),
                                                            prompts=deep))
        logits = self.logits_from_hidden(hidden_states)[:, prompt_length:]
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 session: InferenceSession | None = None, **kwargs: Any) -> torch.Tensor:
        _check_no_padding(attention_mask)
        if self.deep_prompts is not None:  # inference steps carry no prompts: the answer would silently ignore them
            raise NotImplementedError("generate() does not support deep prompts yet (inference sessions do not "
                                      "carry them); model(...) applies them")
        return generate(self, input_ids, session=session, **kwargs)

    def close(self) -> None:
        self.view.close()
        if self.verifier is not None:
            self.verifier.close()
        if self._owns_client:
            self.client.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_no_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padded batches are not supported yet: pass sequences of equal length without padding")
