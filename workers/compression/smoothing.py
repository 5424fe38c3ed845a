"""Exact per-channel rescalings between a layer and the Linear layers it feeds (SmoothQuant, AWQ).

If a module P produces the input X of Linear layers C1…Cn and nothing else, then for any positive
vector s over X's channels

    Ci(X) = Wi X = (Wi diag(s)) (diag(s)⁻¹ X)

so dividing P's output channels by s and multiplying the consumers' input columns by s leaves the
model's function unchanged, while moving magnitude between activations and weights. SmoothQuant
uses it to shrink activation outliers before quantizing activations; AWQ to enlarge the weights
that meet large activations before rounding them.

P must be linear in each output channel: a LayerNorm/RMSNorm (scale its weight and bias) or a
Linear (scale its rows and bias). Where P's output also feeds the residual stream (BERT's
post-norm LayerNorms) the rescaling is not exact, so those pairs are not listed. The pairs a block
allows (`block_balances`), by architecture:

- Llama-style decoders (Llama, Mistral, Qwen2/3, SmolLM2): input_layernorm → q/k/v_proj;
  v_proj → o_proj; post_attention_layernorm → gate/up_proj; up_proj → down_proj.
- BERT-style encoders: attention.self.value → attention.output.dense.

v_proj → o_proj goes through attention, which mixes positions but not channels, so it is exact
too. With grouped-query attention one v channel feeds the same channel of every query head in its
group, so the scales are chosen per v channel and repeated across the group on o_proj's side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Norms whose output is `weight * normalized (+ bias)`: dividing the weight (and bias) divides the
# output. (Gemma's RMSNorm multiplies by 1 + weight and is deliberately absent.)
_SCALABLE_NORMS = ("LayerNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


@dataclass(frozen=True)
class Balance:
    """A producer and the Linear layers that read its output; names relative to the block."""

    producer: str
    consumers: tuple[str, ...]
    # (query heads, key/value heads, head_dim) when the producer is v_proj and the consumer o_proj
    # under grouped-query attention; None when channels map one to one.
    heads: tuple[int, int, int] | None = None

    def consumer_channels(self, producer_scales: torch.Tensor) -> torch.Tensor:
        """The scales for the consumers' input columns, from one per producer output channel."""
        if self.heads is None:
            return producer_scales
        num_heads, num_kv_heads, head_dim = self.heads
        per_kv = producer_scales.reshape(num_kv_heads, 1, head_dim)
        return per_kv.expand(num_kv_heads, num_heads // num_kv_heads, head_dim).reshape(-1)

    def producer_channels(self, consumer_values: torch.Tensor) -> torch.Tensor:
        """Per-consumer-column statistics (maxima) reduced to one per producer output channel."""
        if self.heads is None:
            return consumer_values
        num_heads, num_kv_heads, head_dim = self.heads
        grouped = consumer_values.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim)
        return grouped.amax(dim=1).reshape(-1)


def _has(block: nn.Module, *names: str) -> bool:
    try:
        for name in names:
            block.get_submodule(name)
    except AttributeError:
        return False
    return True


def _scalable_norm(block: nn.Module, name: str) -> bool:
    module = block.get_submodule(name)
    return type(module).__name__ in _SCALABLE_NORMS and getattr(module, "weight", None) is not None


def block_balances(block: nn.Module, config) -> list[Balance]:
    """The exact rescalings `block` allows (see the module docstring); [] when none is known."""
    balances = []
    if _has(block, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        if _has(block, "input_layernorm") and _scalable_norm(block, "input_layernorm"):
            balances.append(Balance("input_layernorm", attention))
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        o_proj = block.get_submodule("self_attn.o_proj")
        if o_proj.in_features == num_heads * head_dim:
            heads = None if num_kv_heads == num_heads else (num_heads, num_kv_heads, head_dim)
            balances.append(Balance("self_attn.v_proj", ("self_attn.o_proj",), heads))
        if _has(block, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            if _has(block, "post_attention_layernorm") and _scalable_norm(
                block, "post_attention_layernorm"
            ):
                balances.append(
                    Balance("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
                )
            balances.append(Balance("mlp.up_proj", ("mlp.down_proj",)))
    elif _has(block, "attention.self.value", "attention.output.dense"):
        balances.append(Balance("attention.self.value", ("attention.output.dense",)))
    return balances


@torch.no_grad()
def apply_scales(block: nn.Module, balance: Balance, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by `scales` (one per channel) and multiply the
    consumers' matching input columns by them. Exact up to float rounding."""
    producer = block.get_submodule(balance.producer)
    scales = scales.to(producer.weight.device)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(scales.to(producer.weight.dtype).unsqueeze(1))
    else:
        producer.weight.div_(scales.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(scales.to(producer.bias.dtype))
    columns = balance.consumer_channels(scales)
    for name in balance.consumers:
        consumer = block.get_submodule(name)
        consumer.weight.mul_(columns.to(consumer.weight.dtype).unsqueeze(0))


def consumer_weight_max(block: nn.Module, balance: Balance) -> torch.Tensor:
    """max |W[:, j]| over all consumers, per consumer input column j."""
    return torch.stack(
        [block.get_submodule(name).weight.detach().abs().amax(dim=0) for name in balance.consumers]
    ).amax(dim=0)
