"""Pruning masks and sparsity counts: pure functions on tensors, shared by magnitude, wanda and
sparsegpt.

A mask is a bool tensor shaped like the weight W [out, in] (or any 2-D block of it); True keeps a
weight. Masks are chosen from a score per weight (|W| for magnitude, |W|·||X_j|| for Wanda,
w² / [U_jj]² for SparseGPT), in one of two patterns:

- unstructured: each row keeps the (1 - sparsity) share of its weights with the largest scores.
  Rows are compared separately, as Wanda does: every output then loses the same number of inputs,
  which Sun et al. found better for LLMs than one threshold over the whole layer (a few rows with
  large weights would otherwise keep most of them).
- 2:4 (semi-structured): in every group of 4 consecutive input weights of a row, the 2 with the
  largest scores are kept. That is the layout NVIDIA's sparse tensor cores (Ampere and later)
  multiply at up to twice the dense rate; it removes exactly half of the weights.

Ties are broken by position (the first of equal scores are pruned), so a mask depends only on
its scores.

What a pruned model holds in memory (what `formats/sparse_bitmask` reads): every pruned layer stays an
`nn.Linear` whose pruned weights are exact zeros, and carries its pattern ("unstructured" or "2:4")
as `module.slimformer_sparsity`, so that the export knows which layers to store compressed.
"""

from __future__ import annotations

import torch
from torch import nn

# The attribute a pruned nn.Linear carries (see the module docstring).
ATTRIBUTE = "slimformer_sparsity"
PATTERNS = ("unstructured", "2:4")


def pruned_per_row(width: int, sparsity: float) -> int:
    """How many of a row's `width` weights an unstructured mask removes: floor(width · sparsity),
    so the achieved sparsity never exceeds the target."""
    return int(width * sparsity)


def keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured mask [rows, cols]: each row keeps all but its `pruned_per_row` lowest scores."""
    rows, cols = scores.shape
    pruned = pruned_per_row(cols, sparsity)
    if not pruned:
        return torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    # The pruned-th lowest score of each row (a selection, not a full sort: several times faster
    # on wide rows). Everything up to it goes, unless a row has ties there: then everything below
    # it, and of the scores equal to it the first ones until `pruned`.
    threshold = torch.kthvalue(scores, pruned, dim=1, keepdim=True).values
    at_most = scores <= threshold
    if bool((at_most.sum(dim=1) == pruned).all()):
        return ~at_most
    tied = scores == threshold
    wanted = pruned - (at_most & ~tied).sum(dim=1, keepdim=True)
    return ~((at_most & ~tied) | (tied & (tied.cumsum(dim=1) <= wanted)))


def two_of_four(scores: torch.Tensor) -> torch.Tensor:
    """2:4 mask [rows, cols]: the 2 highest scores of every 4 consecutive columns survive."""
    rows, cols = scores.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs a width divisible by 4, got {cols}")
    groups = scores.reshape(rows, cols // 4, 4)
    lowest = torch.sort(groups, dim=2, stable=True).indices[:, :, :2]
    return torch.ones_like(groups, dtype=torch.bool).scatter_(2, lowest, False).reshape(rows, cols)


def mask_for(scores: torch.Tensor, *, sparsity: float, pattern: str) -> torch.Tensor:
    if pattern == "2:4":
        return two_of_four(scores)
    if pattern == "unstructured":
        return keep_largest(scores, sparsity)
    raise ValueError(f"unknown sparsity pattern {pattern!r}; expected one of {PATTERNS}")


def prune_(linear: nn.Linear, mask: torch.Tensor, *, pattern: str) -> None:
    """Zero `linear`'s weights outside `mask` in place and mark the layer as pruned. masked_fill
    writes +0.0 (a product with the mask would leave -0.0 where a weight was negative)."""
    with torch.no_grad():
        linear.weight.masked_fill_(~mask.to(linear.weight.device), 0)
    setattr(linear, ATTRIBUTE, pattern)


def follows_two_of_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive input weights of every row has at most 2 nonzeros."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight != 0).reshape(rows, cols // 4, 4).sum(dim=2) <= 2).all())


def sparsity_of(weight: torch.Tensor) -> dict:
    """{"sparsity": fraction of exact zeros, "nonzero": count of the others} of one tensor."""
    nonzero = int(torch.count_nonzero(weight))
    total = weight.numel()
    return {"sparsity": (total - nonzero) / total if total else 0.0, "nonzero": nonzero}
