"""What a training stage needs besides its loss: batches of text, the learning-rate schedule, and
checkpoints of the whole training state, so a killed run continues at the step it saved.

Batches are a pure function of (texts, tokenizer, settings, seed, step): a resumed run reads exactly
the batches the killed one would have read, and with the saved weights and optimizer moments it
continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from workers.compression.data import special_tokens_around, token_stream


@dataclass
class TextBatches:
    """Training and held-out examples as token ids. Causal models get contiguous windows of
    `seq_len` tokens cut from the concatenated texts; encoders get one text per example (padded
    per batch), as they are used."""

    train: list[list[int]]
    held_out: list[list[int]]
    pad_id: int
    seed: int
    _permutations: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        texts: list[str],
        tokenizer,
        *,
        causal: bool,
        seq_len: int,
        seed: int,
        held_out_fraction: float = 0.1,
        max_held_out: int | None = None,
    ) -> TextBatches:
        """`max_held_out` (None: 16 windows for causal models, 64 texts for encoders) keeps the
        held-out evaluations a small part of a short training budget."""
        if max_held_out is None:
            max_held_out = 16 if causal else 64
        texts = [text for text in texts if text.strip()]
        if causal:
            examples = _windows(texts, tokenizer, seq_len)
        else:
            encoded = tokenizer(texts, truncation=True, max_length=seq_len, verbose=False)
            examples = [ids for ids in encoded["input_ids"] if ids]
        if len(examples) < 2:
            raise ValueError(
                f"the training text gives {len(examples)} example(s) of up to {seq_len} tokens; "
                "distillation needs at least two (one is held out)"
            )
        # The held-out examples are the last ones: for windows of a stream, the end of the text.
        count = min(max_held_out, max(1, round(len(examples) * held_out_fraction)))
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return cls(examples[:-count], examples[-count:], pad_id, seed)

    def batch(self, step: int, batch_size: int) -> list[list[int]]:
        """The examples of training step `step`: epochs of seeded permutations, read in order."""
        size = len(self.train)
        picked = []
        for position in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(position, size)
            picked.append(self.train[self._permutation(epoch)[offset]])
        return picked

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:  # one epoch at a time is kept
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations.clear()
            self._permutations[epoch] = torch.randperm(
                len(self.train), generator=generator
            ).tolist()
        return self._permutations[epoch]

    def collate(self, examples: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), right-padded to the longest example."""
        length = max(len(ids) for ids in examples)
        ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            ids[row, : len(example)] = torch.tensor(example)
            mask[row, : len(example)] = 1
        return ids, mask

    @property
    def train_tokens(self) -> int:
        return sum(len(ids) for ids in self.train)


def _windows(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    prefix, suffix = special_tokens_around(tokenizer)
    content = seq_len - len(prefix) - len(suffix)
    if content < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room next to the special tokens")
    stream = token_stream(texts, tokenizer)
    return [
        prefix + stream[start : start + content] + suffix
        for start in range(0, len(stream) - content + 1, content)
    ]


def learning_rate(step: int, *, peak: float, steps: int, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    remaining = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / remaining)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- checkpoints -----------------------------------------------------------------------------------


class TrainingCheckpoint(Protocol):
    """Where a training stage keeps its state every N steps (the service: storage, keyed like the
    block checkpoints). `save` must be atomic: a reader sees the previous state or the new one."""

    def load_training(self) -> tuple[dict[str, torch.Tensor], dict] | None: ...

    def save_training(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and AdamW moments as flat named tensors, and what else resuming needs."""
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, moments in state["state"].items():
        for key, value in moments.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
    return tensors, {"step": step, "param_groups": groups}


def restore_training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict,
) -> int:
    """Load what `training_state` saved into a freshly built model and optimizer; the next step."""
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    groups = [
        {**saved, "params": group["params"]}
        for saved, group in zip(meta["param_groups"], current["param_groups"], strict=True)
    ]
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    return int(meta["step"])
