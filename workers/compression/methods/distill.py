"""Knowledge distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019): a smaller student is
trained to reproduce its teacher on text.

Who is who:
- `student.num_layers`: the teacher is the model coming in; the student is a copy keeping that many
  of its blocks, evenly spaced and with their weights (the first and last always kept).
- `student.model_id`: the teacher is the model coming in; the student is another registered model
  with the same vocabulary (the stage's result is then that model).
- no `student`: the model coming in (pruned or structurally shrunk by an earlier stage) is the
  student and the model the recipe started from is the teacher -- recovery after pruning. Weights
  that pruning set to zero stay zero (their masks are re-applied after every optimizer step).

Loss = kl * KL(student || teacher on logits / T) * T^2 + hidden * relative MSE of mapped hidden
states + lm * next-token cross-entropy. An encoder without an LM head has no logits: its `kl` term
is 1 - cosine of the mean-pooled embeddings (what the evaluation measures).

The loop: AdamW, linear warm-up then cosine decay, gradient accumulation over micro-batches,
gradient clipping, bf16 autocast on GPUs that have it, held-out evaluation, and the full training
state checkpointed every `checkpoint_every` steps so a killed run continues where it saved. Dropout
stays off (short budgets, and a resumed run must compute what the killed one would have).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from workers.compression.calibration import model_blocks, model_device
from workers.compression.evaluation import parameter_count
from workers.compression.recipe import DistillConfig
from workers.compression.registry import StageContext, register_method
from workers.compression.training import (
    TextBatches,
    learning_rate,
    restore_training_state,
    training_state,
)

# A weight matrix with at least this fraction of exact zeros was pruned: its zeros are kept.
PRUNED_FRACTION = 0.01


@register_method(DistillConfig)
def distill(model: nn.Module, config: DistillConfig, context: StageContext) -> dict:
    resources = context.resources
    if resources is None:
        raise ValueError(
            "distill trains on text: pass resources=StageResources(tokenizer, texts) to compress"
        )
    teacher, student, pairing, about = _teacher_and_student(model, config, context)
    causal = student.get_output_embeddings() is not None
    if causal != (teacher.get_output_embeddings() is not None):
        raise ValueError("teacher and student must both be causal LMs or both encoders")
    texts = resources.texts(config.dataset_id)
    data = TextBatches.build(
        texts, resources.tokenizer, causal=causal, seq_len=config.seq_len, seed=config.seed
    )
    trainer = _Trainer(teacher, student, pairing, config, causal, data)
    summary = trainer.train(context)
    return {**about, **summary}


# --- who teaches whom ------------------------------------------------------------------------------


@dataclass
class _Pairing:
    """Student block j is taught by teacher block `teacher_blocks[j]` (hidden-state loss), when
    the widths agree (`hidden` False otherwise)."""

    teacher_blocks: list[int]
    hidden: bool


def _teacher_and_student(
    model: nn.Module, config: DistillConfig, context: StageContext
) -> tuple[nn.Module, nn.Module, _Pairing, dict]:
    teacher_depth = len(model_blocks(model)[1])
    if config.student is None:
        if context.original is None:
            raise ValueError("distill without a student needs the original model as the teacher")
        teacher, student = context.original, model
        depth = len(model_blocks(student)[1])
        if depth != len(model_blocks(teacher)[1]):
            raise ValueError("the student has another depth than the original: give student")
        pairing = _Pairing(list(range(depth)), hidden=True)
        about = {"student": {"from": "the model as it came into the stage"}}
    elif config.student.num_layers is not None:
        wanted = config.student.num_layers
        if wanted >= teacher_depth:
            raise ValueError(
                f"student.num_layers {wanted} must be below the teacher's {teacher_depth} blocks"
            )
        teacher = copy.deepcopy(model)
        kept = evenly_spaced(teacher_depth, wanted)
        keep_blocks(model, kept)
        student = model
        pairing = _Pairing(kept, hidden=True)
        about = {"student": {"num_layers": wanted, "teacher_blocks_kept": kept}}
    else:
        resources = context.resources
        if resources is None or resources.load_model is None:
            raise ValueError("student.model_id needs a model loader in the stage resources")
        student = resources.load_model(config.student.model_id)
        student.to(model_device(model))
        teacher = model
        _check_compatible(teacher, student)
        widths = student.config.hidden_size, teacher.config.hidden_size
        if student.get_output_embeddings() is None and widths[0] != widths[1]:
            raise ValueError(
                f"an encoder student must have the teacher's width ({widths[1]}, not {widths[0]}): "
                "without an LM head, their embeddings are compared directly"
            )
        depth = len(model_blocks(student)[1])
        pairing = _Pairing(
            evenly_spaced(teacher_depth, depth) if depth <= teacher_depth else [],
            hidden=student.config.hidden_size == teacher.config.hidden_size
            and depth <= teacher_depth,
        )
        context.replaced_by = student
        about = {"student": {"model_id": config.student.model_id, "num_layers": depth}}
    about["teacher_parameters"] = parameter_count(teacher)
    about["student_parameters"] = parameter_count(student)
    if not pairing.hidden and config.loss_weights.hidden:
        about["hidden_loss"] = "skipped: the student's width or depth does not map onto the teacher"
    return teacher, student, pairing, about


def evenly_spaced(total: int, wanted: int) -> list[int]:
    """`wanted` indices out of range(total), spread evenly, first and last included."""
    if wanted == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (wanted - 1)) for i in range(wanted)})


def keep_blocks(model: nn.Module, kept: list[int]) -> None:
    """Keep only the blocks `kept` (in order), in place, and make the config and the blocks'
    cache indices agree with the new depth, so the model saves, loads and generates."""
    name, blocks = model_blocks(model)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.ModuleList([blocks[index] for index in kept]))
    for new_index, block in enumerate(model.get_submodule(name)):
        for module in block.modules():
            if getattr(module, "layer_idx", None) is not None:
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(blocks):
        config.layer_types = [layer_types[index] for index in kept]


def _check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    t_vocab = getattr(teacher.config, "vocab_size", None)
    s_vocab = getattr(student.config, "vocab_size", None)
    if t_vocab != s_vocab:
        raise ValueError(
            f"the student's vocabulary ({s_vocab}) is not the teacher's ({t_vocab}): "
            "distillation needs the same tokenizer"
        )


# --- the loop --------------------------------------------------------------------------------------


class _Trainer:
    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        pairing: _Pairing,
        config: DistillConfig,
        causal: bool,
        data: TextBatches,
    ) -> None:
        self.teacher, self.student, self.pairing = teacher, student, pairing
        self.config, self.causal, self.data = config, causal, data
        self.device = model_device(student)
        weights = config.loss_weights
        self.want_hidden = weights.hidden > 0 and pairing.hidden
        self.micro = config.micro_batch_size or config.batch_size
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported()

    # One forward of both models on a batch: the loss terms (unweighted) and the total.
    def _losses(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        config = self.config
        weights = config.loss_weights
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            with torch.no_grad():
                teacher_out = self.teacher(
                    input_ids=ids, attention_mask=mask, output_hidden_states=self.want_hidden
                )
            student_out = self.student(
                input_ids=ids, attention_mask=mask, output_hidden_states=self.want_hidden
            )
        present = mask.bool()
        terms: dict[str, torch.Tensor] = {}
        if self.causal:
            if weights.kl:
                temperature = config.temperature
                student_logp = F.log_softmax(student_out.logits[present].float() / temperature, -1)
                teacher_logp = F.log_softmax(teacher_out.logits[present].float() / temperature, -1)
                terms["kl"] = F.kl_div(
                    student_logp, teacher_logp, log_target=True, reduction="batchmean"
                ) * (temperature**2)
            if weights.lm or not torch.is_grad_enabled():  # held-out perplexity needs it
                targets = present[:, 1:]
                terms["lm"] = F.cross_entropy(
                    student_out.logits[:, :-1][targets].float(), ids[:, 1:][targets]
                )
        elif weights.kl:
            terms["kl"] = (
                1
                - F.cosine_similarity(
                    _mean_pooled(student_out.last_hidden_state, mask),
                    _mean_pooled(teacher_out.last_hidden_state, mask),
                    dim=-1,
                ).mean()
            )
        if self.want_hidden:
            pairs = [
                (student_out.hidden_states[j + 1], teacher_out.hidden_states[t + 1])
                for j, t in enumerate(self.pairing.teacher_blocks)
            ]
            terms["hidden"] = torch.stack(
                [
                    (s[present].float() - t[present].float()).pow(2).mean()
                    / t[present].float().pow(2).mean().clamp(min=1e-12)
                    for s, t in pairs
                ]
            ).mean()
        total = sum(getattr(weights, name) * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def held_out(self) -> dict:
        """Mean loss on the held-out examples; the student's perplexity there (causal) or its
        pooled-embedding cosine to the teacher (encoders)."""
        totals: dict[str, float] = {}
        count = 0
        examples = self.data.held_out
        for start in range(0, len(examples), self.micro):
            ids, mask = self.data.collate(examples[start : start + self.micro])
            total, terms = self._losses(ids, mask)
            size = len(ids)
            totals["loss"] = totals.get("loss", 0.0) + float(total) * size
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + float(value) * size
            count += size
        result = {name: round(value / count, 6) for name, value in totals.items()}
        if self.causal:
            result["perplexity"] = round(math.exp(result["lm"]), 4)
            if not self.config.loss_weights.lm:
                del result["lm"]
        elif "kl" in result:
            result["cosine"] = round(1 - result["kl"], 6)
        return result

    def train(self, context: StageContext) -> dict:
        config = self.config
        student, teacher = self.student, self.teacher
        teacher.eval()
        teacher.requires_grad_(False)
        student.eval()  # dropout off; gradients still flow
        parameters = [p for p in student.parameters()]
        masks = _pruning_masks(student)
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        steps = config.steps
        warmup = config.warmup_steps if config.warmup_steps is not None else steps // 10
        eval_every = config.eval_every or max(1, steps // 5)
        checkpoint = context.checkpoint if hasattr(context.checkpoint, "save_training") else None

        start, history, losses = 0, [], []
        # Training seconds before this run (a resumed job): the history's clock continues.
        resumed_seconds = 0.0
        saved = checkpoint.load_training() if checkpoint is not None else None
        if saved is not None:
            tensors, meta = saved
            start = restore_training_state(student, optimizer, tensors, meta)
            history, losses = meta["history"], meta["losses"]
            resumed_seconds = meta["seconds"]
        else:
            history.append({"step": 0, "seconds": 0.0, **self.held_out()})
        resumed_from = start or None

        started = time.perf_counter()
        tokens = 0
        try:
            for step in range(start, steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(
                        step, peak=config.learning_rate, steps=steps, warmup=warmup
                    )
                batch = self.data.batch(step, config.batch_size)
                step_loss = 0.0
                for offset in range(0, len(batch), self.micro):
                    ids, mask = self.data.collate(batch[offset : offset + self.micro])
                    total, _ = self._losses(ids, mask)
                    share = len(ids) / len(batch)
                    (total * share).backward()
                    step_loss += float(total.detach()) * share
                    tokens += int(mask.sum())
                grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for parameter, keep in masks:
                        parameter.mul_(keep)
                losses.append(round(step_loss, 6))
                done = step + 1
                evaluated = None
                if done % eval_every == 0 or done == steps:
                    seconds = round(time.perf_counter() - started + resumed_seconds, 2)
                    evaluated = {"step": done, "seconds": seconds, **self.held_out()}
                    history.append(evaluated)
                elapsed = time.perf_counter() - started
                data = {
                    "step": done,
                    "loss": round(step_loss, 6),
                    "learning_rate": optimizer.param_groups[0]["lr"],
                    "grad_norm": round(grad_norm, 4),
                    "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
                }
                if evaluated is not None:
                    data["held_out"] = evaluated
                context.report(done, steps, _message(done, steps, data), data)
                if checkpoint is not None and done % config.checkpoint_every == 0 and done < steps:
                    tensors, meta = training_state(student, optimizer, done)
                    seconds = time.perf_counter() - started + resumed_seconds
                    checkpoint.save_training(
                        tensors,
                        {**meta, "history": history, "losses": losses, "seconds": seconds},
                    )
        finally:
            for parameter in parameters:
                parameter.requires_grad_(False)
                parameter.grad = None
            del optimizer
        elapsed = time.perf_counter() - started
        return {
            "steps": steps,
            "resumed_from_step": resumed_from,
            "batch_size": config.batch_size,
            "training_examples": len(self.data.train),
            "held_out_examples": len(self.data.held_out),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 and tokens else None,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "held_out": history,
            "pruning_masks_kept": len(masks),
        }


def _message(step: int, steps: int, data: dict) -> str:
    parts = [f"step {step}/{steps}", f"loss {data['loss']:.4f}"]
    held = data.get("held_out")
    if held is not None:
        if "perplexity" in held:
            parts.append(f"held-out perplexity {held['perplexity']:.2f}")
        elif "cosine" in held:
            parts.append(f"held-out cosine {held['cosine']:.4f}")
    if data.get("tokens_per_s"):
        parts.append(f"{data['tokens_per_s']:.0f} tokens/s")
    return " · ".join(parts)


def _mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def _pruning_masks(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, nonzero mask) of every Linear that pruning left with exact zeros."""
    masks = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            keep = module.weight.detach() != 0
            if 1 - keep.float().mean().item() >= PRUNED_FRACTION:
                masks.append((module.weight, keep))
    return masks
