"""The transformer blocks a peer serves, run with per-session attention caches.

The blocks are transformers' own decoder layers of the model's family (so numerics equal the
local model), loaded one block file at a time from the cache: never the embeddings, the head,
or a block outside the span.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from protocol.families import family_classes, family_module
from protocol.packed_linear import pack_linears
from protocol.weights import ModelStore

logger = logging.getLogger(__name__)


def add_prompt(hidden_states: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """hidden states [batch, tokens, hidden] with `prompt` [prompt tokens, hidden] added to the
    first positions of every sequence. Out of place: the caller's tensor stays as it was, and
    autograd sees the sum (its gradient reaches the prompt summed over the batch)."""
    length = prompt.shape[0]
    return torch.cat([hidden_states[:, :length] + prompt, hidden_states[:, length:]], dim=1)


class AttentionCache:
    """Keys and values of one session for a run of consecutive blocks, preallocated to max_length.

    transformers' attention calls `update(keys, values, layer_idx)` and attends over what it
    returns; writing in place into a preallocated buffer keeps a step's cost independent of
    the prefix length (no concatenation of the whole history per token).
    """

    def __init__(self, first_block: int, num_blocks: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_length: int, dtype: torch.dtype):
        shape = (num_blocks, batch_size, num_kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)
        self.values = torch.zeros(shape, dtype=dtype)
        self.first_block = first_block
        self.max_length = max_length
        self.length = 0  # positions held
        self._write_position = 0
        # per block, [batch * kv heads, max_length, head_dim] views: one token's step reads them
        # without re-slicing the 5-d tensors (see BlockSpan._attend_one_token)
        self._flat_keys = [keys.flatten(0, 1) for keys in self.keys.unbind(0)]
        self._flat_values = [values.flatten(0, 1) for values in self.values.unbind(0)]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def begin_step(self, position: int, new_tokens: int) -> None:
        if position > self.length:
            raise ValueError(f"step starts at position {position} but the session holds {self.length}")
        if position + new_tokens > self.max_length:
            raise ValueError(f"{position + new_tokens} tokens exceed the session's max_length {self.max_length}")
        self._write_position = position  # below length: roll back to it

    def end_step(self, new_tokens: int) -> None:
        self.length = self._write_position + new_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        index = layer_idx - self.first_block
        end = self._write_position + key_states.shape[2]
        self.keys[index, :, :, self._write_position : end] = key_states
        self.values[index, :, :, self._write_position : end] = value_states
        return self.keys[index, :, :, :end], self.values[index, :, :, :end]

    def append_token(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One position's keys and values [batch, kv heads, head_dim] written at the step's
        position; every position's so far, as [batch * kv heads, positions, head_dim]."""
        index, position = layer_idx - self.first_block, self._write_position
        keys, values = self._flat_keys[index], self._flat_values[index]
        keys[:, position] = key_states.view(keys.shape[0], -1)
        values[:, position] = value_states.view(values.shape[0], -1)
        return keys[:, : position + 1], values[:, : position + 1]


def _fast_weights(layer: nn.Module, packed: bool = True) -> None:
    """Weights laid out for products with a few rows of inputs (generation steps): packed by
    oneDNN where torch has it (a batch of sessions then costs about one session's weight reads,
    see protocol.packed_linear), otherwise stored column-major, so that `linear` multiplies by a
    contiguous transpose (one row through 10 blocks of the embedded model: 7.0 instead of 9.5 ms
    on the machine that measured it). Same values and shapes; sums may round differently in the
    last bits."""
    copied = set()
    if not (packed and pack_linears(layer)):
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(module.weight.detach().t().contiguous().t(), requires_grad=False)
                copied.add(id(module.weight))
    # The loaded tensors are views of their block file's memory map; one left in place (a norm's
    # weight) would keep the whole file resident beside the copies made above (a peer's memory
    # was twice its weights). Own copies of the rest let the mapping go.
    for parameter in layer.parameters():
        if id(parameter) not in copied:
            parameter.data = parameter.data.clone()


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model, with the rotary embedding they share."""

    def __init__(self, store: ModelStore, start: int, end: int, packed: bool = True):
        """`packed=False` keeps torch's dense weights (column-major) even where oneDNN could pack them."""
        super().__init__()
        if not 0 <= start < end <= store.num_blocks:
            raise ValueError(f"blocks {start}:{end} are out of range: the model has blocks 0..{store.num_blocks - 1}"
                             f" (use --blocks A:B with 0 <= A < B <= {store.num_blocks})")
        self.config = store.config()
        self.start, self.end = start, end
        layer_class, rotary_class = family_classes(store.model_type)
        layers = []
        for index in range(start, end):
            with torch.device("meta"):  # no throwaway random init: the real weights are assigned below
                layer = layer_class(self.config, layer_idx=index)
            layer.load_state_dict(store.block_state(index), strict=True, assign=True)
            _fast_weights(layer, packed)
            layers.append(layer.eval())
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary_class(config=self.config)
        self.requires_grad_(False)
        self.apply_rotary = family_module(store.model_type).apply_rotary_pos_emb
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        self.hidden_size = self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    def new_cache(self, start: int, end: int, batch_size: int, max_length: int) -> AttentionCache:
        return AttentionCache(start, end - start, batch_size, self.config.num_key_value_heads, self.head_dim,
                              max_length, self.dtype)

    def cache_bytes_per_token(self, start: int, end: int) -> int:
        return 2 * (end - start) * self.config.num_key_value_heads * self.head_dim * self.dtype.itemsize

    @torch.inference_mode()
    def forward(self, hidden_states: torch.Tensor, start: int, end: int, position: int = 0,
                cache: AttentionCache | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """`prompts` [end - start, prompt tokens, hidden]: deep prompts, one added before each
        block to the first positions of every sequence (whole sequences only: no cache)."""
        return self._run_layers(hidden_states, start, end, position, cache, prompts)

    def backward(self, hidden_states: torch.Tensor, grad_outputs: torch.Tensor, start: int, end: int,
                 prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of blocks start:end with respect to their inputs and to their deep prompts
        (None without prompts; the weights stay frozen): the forward is recomputed with autograd
        on, so peers keep no activations between calls."""
        with torch.enable_grad():
            inputs = hidden_states.detach().requires_grad_(True)
            if prompts is None:
                outputs = self._run_layers(inputs, start, end, 0, None)
                return torch.autograd.grad(outputs, inputs, grad_outputs)[0], None
            prompts = prompts.detach().requires_grad_(True)
            outputs = self._run_layers(inputs, start, end, 0, None, prompts)
            grad_inputs, grad_prompts = torch.autograd.grad(outputs, (inputs, prompts), grad_outputs)
        return grad_inputs, grad_prompts

    def _run_layers(self, hidden_states: torch.Tensor, start: int, end: int, position: int,
                    cache: AttentionCache | None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        if prompts is not None and (position != 0 or cache is not None):
            raise ValueError("deep prompts apply to whole sequences from position 0, without a cache")
        batch_size, new_tokens, _ = hidden_states.shape
        positions = torch.arange(position, position + new_tokens).unsqueeze(0).expand(batch_size, -1)
        position_embeddings = self.rotary(hidden_states, positions)
        mask = None  # causal via SDPA's is_causal (prefill) or nothing to mask (one new token)
        if cache is not None:
            cache.begin_step(position, new_tokens)
            if new_tokens > 1 and position > 0:  # new tokens see the whole prefix and their own causal past
                past = torch.arange(position + new_tokens).unsqueeze(0)
                mask = (past <= positions[:1].unsqueeze(-1)).unsqueeze(0)  # [1, 1, new, total]
        for index, layer in enumerate(self.layers[start - self.start : end - self.start]):
            if prompts is not None:
                hidden_states = add_prompt(hidden_states, prompts[index])
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=positions,
                                  past_key_values=cache, position_embeddings=position_embeddings)
        if cache is not None:
            cache.end_step(new_tokens)
        return hidden_states

    @torch.inference_mode()
    def forward_many(self, steps: list[tuple[torch.Tensor, int, AttentionCache]], start: int, end: int
                     ) -> list[torch.Tensor]:
        """Steps of one or several sessions through blocks start:end as one batch.

        Token-wise work (norms, projections, MLP, the rotary embedding) runs once over the tokens
        of all sessions, so the weights are read from memory once instead of once per session;
        attention runs per session over its own cache and positions. Same layers, same numbers up
        to float rounding.
        """
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        shapes = [hidden.shape for hidden, _, _ in steps]
        hidden_states = torch.cat([hidden.reshape(1, -1, hidden.shape[-1]) for hidden, _, _ in steps], dim=1)
        # every token's position, in the order of hidden_states: the rotary embedding then turns the
        # queries and keys of all sessions at once (as many ops for 4 sessions as for one)
        all_positions, masks = [], []
        for (hidden, position, cache), (batch_size, new_tokens, _) in zip(steps, shapes):
            cache.begin_step(position, new_tokens)
            positions = torch.arange(position, position + new_tokens)
            all_positions.append(positions.repeat(batch_size))
            mask = None
            if new_tokens > 1 and position > 0:
                past = torch.arange(position + new_tokens).unsqueeze(0)
                mask = (past <= positions.unsqueeze(-1)).unsqueeze(0).unsqueeze(0)  # [1, 1, new, total]
            masks.append(mask)
        cos, sin = self.rotary(hidden_states, torch.cat(all_positions).unsqueeze(0))
        total = hidden_states.shape[1]
        one_token = all(new_tokens == 1 for _, new_tokens, _ in shapes)
        counts = [batch_size * new_tokens for batch_size, new_tokens, _ in shapes]
        caches = [cache for _, _, cache in steps]
        for layer in self.layers[start - self.start : end - self.start]:
            attention = layer.self_attn
            residual = hidden_states
            normed = layer.input_layernorm(hidden_states)
            if one_token:
                attended = self._attend_one_token(attention, normed[0], cos[0], sin[0], caches, counts)
            else:
                queries, keys, values = (projection(normed).view(1, total, -1, self.head_dim).transpose(1, 2)
                                         for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
                queries, keys = self.apply_rotary(queries, keys, cos, sin)  # [1, heads, total, head_dim]
                outputs, offset = [], 0
                for cache, (batch_size, new_tokens, _), mask, count in zip(caches, shapes, masks, counts):
                    view = lambda tensor: tensor[0, :, offset : offset + count].reshape(  # noqa: E731
                        -1, batch_size, new_tokens, self.head_dim).transpose(0, 1)  # [batch, heads, new, head_dim]
                    key, value = cache.update(view(keys), view(values), attention.layer_idx)
                    output, _ = sdpa_attention_forward(attention, view(queries), key, value, mask, dropout=0.0,
                                                       scaling=attention.scaling)
                    outputs.append(output.reshape(1, count, -1))
                    offset += count
                attended = torch.cat(outputs, dim=1)
            hidden_states = residual + attention.o_proj(attended)
            hidden_states = hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))
        results, offset = [], 0
        for (_, _, cache), (batch_size, new_tokens, hidden_size) in zip(steps, shapes):
            cache.end_step(new_tokens)
            count = batch_size * new_tokens
            results.append(hidden_states[:, offset : offset + count].reshape(batch_size, new_tokens, hidden_size))
            offset += count
        return results

    def _attend_one_token(self, attention: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          caches: list[AttentionCache], counts: list[int]) -> torch.Tensor:
        """Self-attention of a batch in which every sequence brings one new token: `normed`
        [tokens, hidden], each session's `counts` rows in turn; the attended values [1, tokens,
        heads * head_dim] for the output projection.

        A new token attends to every cached position, so no mask; what is left per session is
        two small products and a softmax over its own cache, a dozen cheap torch calls instead of
        the general path's thirty (views of 5-d caches, transformers' SDPA wrapper, CPU flash
        attention's set-up, which alone took 56 us per session and block). Same arithmetic up to
        float32 rounding."""
        total, head_dim = normed.shape[0], self.head_dim
        queries, keys, values = (projection(normed).view(total, -1, head_dim)
                                 for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
        queries, keys = self.apply_rotary(queries, keys, cos, sin)  # [tokens, heads, head_dim]
        queries = queries * attention.scaling
        group = queries.shape[1] // keys.shape[1]  # query heads per key/value head, in order
        attended = torch.empty_like(queries)
        for cache, query, key, value, output in zip(caches, queries.split(counts), keys.split(counts),
                                                    values.split(counts), attended.split(counts)):
            cached_keys, cached_values = cache.append_token(key, value, attention.layer_idx)
            scores = torch.bmm(query.view(-1, group, head_dim), cached_keys.transpose(1, 2))
            torch.bmm(scores.softmax(dim=-1), cached_values, out=output.view(-1, group, head_dim))
        return attended.view(1, total, -1)
