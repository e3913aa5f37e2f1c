"""Token generation over an inference session, with Hugging Face `generate` semantics.

Greedy unless sampling is asked for; sampling applies HF's own logits warpers in HF's order
(repetition penalty, temperature, top-k, top-p) and draws with `torch.multinomial`, so a seeded
run matches HF's. Streamers get the prompt first, then each new token, then `end()`.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

if TYPE_CHECKING:
    from swarm.model import DistributedModelForCausalLM
    from swarm.session import InferenceSession


def _settings(model: DistributedModelForCausalLM, generation_config: GenerationConfig | None,
              kwargs: dict[str, Any]) -> GenerationConfig:
    config = copy.deepcopy(generation_config or model.generation_config)
    unknown = config.update(**kwargs)
    if unknown:
        raise TypeError(f"generate() got unsupported arguments: {sorted(unknown)}")
    if config.temperature is not None and config.temperature == 0:
        config.do_sample = False  # temperature 0 means greedy
    return config


class _MinNewTokens:
    """transformers' MinNewTokensLengthLogitsProcessor (end-of-sequence tokens get -inf until
    `min_new_tokens` were generated), without its vocabulary-sized mask rebuilt for every token
    (a quarter of a client's processor time per token on the embedded model). In place: the
    scores are generate's own, fresh for every token."""

    def __init__(self, prompt_length: int, min_new_tokens: int, eos_ids: list[int]):
        self.prompt_length, self.min_new_tokens, self.eos_ids = prompt_length, min_new_tokens, eos_ids

    def banned(self, input_ids: torch.LongTensor, vocab_size: int) -> list[int]:
        if input_ids.shape[-1] - self.prompt_length >= self.min_new_tokens:
            return []
        return [eos for eos in self.eos_ids if 0 <= eos < vocab_size]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        banned = self.banned(input_ids, scores.shape[-1])
        if banned:
            scores[:, banned] = -math.inf
        return scores


def _warpers(config: GenerationConfig, prompt_length: int, eos_ids: list[int]) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.min_new_tokens and eos_ids:
        processors.append(_MinNewTokens(prompt_length, config.min_new_tokens, eos_ids))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


def _eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def generate(model: DistributedModelForCausalLM, input_ids: torch.Tensor, session: InferenceSession | None = None,
             generation_config: GenerationConfig | None = None, streamer: Any = None,
             **kwargs: Any) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    config = _settings(model, generation_config, kwargs)
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = max(0, (config.max_length or 20) - input_ids.shape[1])
    eos_ids = _eos_ids(config)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    batch_size = input_ids.shape[0]
    history = session.token_ids if session is not None and session.token_ids is not None else None
    if history is not None and input_ids.shape[1] >= history.shape[1] and torch.equal(
            input_ids[:, : history.shape[1]], history):
        new_ids = input_ids[:, history.shape[1]:]  # the caller passed the whole conversation so far
        sequence = input_ids
    else:
        new_ids = input_ids
        sequence = input_ids if history is None else torch.cat([history, input_ids], dim=1)
    warpers = _warpers(config, sequence.shape[1], eos_ids)
    # greedy with at most end-of-sequence tokens held back: the head is screened (model.greedy_tokens)
    screened = not config.do_sample and all(isinstance(warper, _MinNewTokens) for warper in warpers)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    generated = input_ids
    prompt_length = model.prompt_embeddings.shape[0] if model.prompt_embeddings is not None else 0
    needed = prompt_length + sequence.shape[1] + max_new_tokens
    with model._use_session(session, max_length=needed, batch_size=batch_size) as active:
        unfinished = torch.ones(batch_size, dtype=torch.bool)
        for index in range(max_new_tokens):
            if new_ids.shape[1] == 0:
                raise ValueError("nothing to generate from: the session already holds these tokens; "
                                 "pass at least one new token")
            hidden_states = active.step(model.embed(new_ids, at_start=active.position == 0))
            active.token_ids = sequence
            next_tokens = None
            if screened:
                banned = [token for warper in warpers for token in warper.banned(sequence, model.config.vocab_size)]
                next_tokens = model.greedy_tokens(hidden_states[:, -1], banned)
            if next_tokens is None:
                logits = model.logits_from_hidden(hidden_states[:, -1]).float()
                scores = warpers(sequence, logits)
                if config.do_sample:
                    next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    next_tokens = torch.argmax(scores, dim=-1)
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_id))
            sequence = torch.cat([sequence, next_tokens[:, None]], dim=1)
            generated = torch.cat([generated, next_tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if eos_ids:
                unfinished &= ~torch.isin(next_tokens, torch.tensor(eos_ids))
            if not unfinished.any():
                break
            new_ids = next_tokens[:, None]
    if streamer is not None:
        streamer.end()
    return generated
