"""Which transformers classes run the blocks of each supported model family.

Peers run a served span with them; a verifying client runs a span itself with the same
classes when no other peer can settle a disagreement (see swarm.verification), so both get the
numbers of the local model.
"""

from __future__ import annotations

import importlib

from torch import nn

_FAMILY_CLASSES = {
    "llama": ("llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "mistral": ("mistral", "MistralDecoderLayer", "MistralRotaryEmbedding"),
    "qwen2": ("qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
}


def family_module(model_type: str):
    if model_type not in _FAMILY_CLASSES:
        raise ValueError(f"model family {model_type!r} is not supported; supported: {sorted(_FAMILY_CLASSES)}")
    module_name = _FAMILY_CLASSES[model_type][0]
    return importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")


def family_classes(model_type: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """The decoder layer class and the rotary embedding class of a family."""
    module, (_, layer_name, rotary_name) = family_module(model_type), _FAMILY_CLASSES[model_type]
    return getattr(module, layer_name), getattr(module, rotary_name)
