"""One harness for the baseline and the compressed model, with the settings it used recorded.

An `Evaluator` fixes everything that could differ between two measurements (texts, token windows,
latency inputs, device) when it is built; `measure` then runs the same passes on any model. The
first `measure` is the baseline: its sentence embeddings are kept so that later measurements report
how close the compressed model's embeddings stay (`embedding_cosine`).
"""

from __future__ import annotations

import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd
from torch.nn import functional as F

from workers.compression import process_memory
from workers.compression.data import special_tokens_around, token_stream
from workers.compression.formats import weight_census
from workers.compression.recipe import EvaluationSettings, default_metrics
from workers.compression.streaming import store_of, stream_forward

if TYPE_CHECKING:
    from workers.compression.loading import LoadedModel

EMBEDDING_BATCH_SIZE = 32

# (steps done, steps in the whole measurement, how a person counts them: "window 7/20").
ProgressFn = Callable[[int, int, str], None]


class Evaluator:
    def __init__(
        self,
        *,
        task: str,
        tokenizer,
        settings: EvaluationSettings,
        records: list[dict],
        device: torch.device | str,
    ) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = torch.device(device)
        self.metrics = list(settings.metrics or default_metrics(task))
        self._probe_split(records)
        if "perplexity" in self.metrics and task != "causal-lm":
            raise ValueError("perplexity needs a causal language model")
        self.texts = [record["text"] for record in records if record["text"].strip()]
        if not self.texts:
            raise ValueError("the evaluation dataset has no text")

        stream = token_stream(self.texts, tokenizer)
        self.text_tokens = len(stream)
        self.windows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stride: int | None = None
        if "perplexity" in self.metrics:
            if len(stream) < 2:
                raise ValueError("perplexity needs at least two tokens of evaluation text")
            self.windows, self.stride = self._perplexity_windows(stream)
        self.embedding_texts = self.texts[: settings.max_samples]
        self.embedding_len = min(settings.seq_len, tokenizer.model_max_length)
        latency = settings.latency
        needed = latency.batch_size * latency.seq_len
        repeated = (stream * (needed // len(stream) + 1))[:needed]  # short datasets are cycled
        self.latency_input = torch.tensor(repeated).reshape(latency.batch_size, latency.seq_len)
        self._baseline_embeddings: torch.Tensor | None = None
        self._on_step: Callable[[], None] | None = None
        self._on_progress: ProgressFn | None = None
        self._done = self._total = 0

    @classmethod
    def for_model(
        cls,
        loaded: LoadedModel,
        *,
        settings: EvaluationSettings,
        records: list[dict],
        device: torch.device | str,
    ) -> Evaluator:
        """The evaluator of a loaded model: its task and its tokenizer (how the benches build one)."""
        return cls(
            task=loaded.task,
            tokenizer=loaded.tokenizer,
            settings=settings,
            records=records,
            device=device,
        )

    def _perplexity_windows(self, stream: list[int]) -> tuple[list, int]:
        """Fixed windows over the token stream, as in the transformers perplexity guide: each window
        scores only the tokens the previous one did not, with up to `seq_len` tokens of context.
        If the tokenizer starts every text with BOS, every window starts with it too (unscored)."""
        prefix, _ = special_tokens_around(self.tokenizer)
        content = self.settings.seq_len - len(prefix)
        stride = min(self.settings.stride or content, content)
        windows, previous_end = [], 0
        for begin in range(0, len(stream), stride):
            end = min(begin + content, len(stream))
            scored = end - previous_end
            ids = prefix + stream[begin:end]
            labels = [-100] * (len(ids) - scored) + stream[end - scored : end]
            windows.append((torch.tensor([ids]), torch.tensor([labels])))
            previous_end = end
            if end == len(stream) or len(windows) == self.settings.max_windows:
                break
        return windows, stride

    def settings_record(self) -> dict:
        """Everything needed to reproduce the numbers `measure` reports."""
        latency = self.settings.latency
        return {
            "task": self.task,
            "metrics": self.metrics,
            "num_texts": len(self.texts),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "num_threads": torch.get_num_threads(),
            "perplexity": {
                "seq_len": self.settings.seq_len,
                "stride": self.stride,
                "max_windows": self.settings.max_windows,
                "windows": len(self.windows),
                "scored_tokens": sum(
                    int((labels[0, 1:] != -100).sum()) for _, labels in self.windows
                ),
            }
            if self.windows
            else None,
            "embedding": {
                "texts": len(self.embedding_texts),
                "max_len": self.embedding_len,
                "batch_size": EMBEDDING_BATCH_SIZE,
                "pooling": "mean over attention mask, L2-normalised",
            }
            if "embedding_cosine" in self.metrics
            else None,
            "accuracy": {
                "probe": "logistic regression on the baseline's embeddings, L2 1e-3, L-BFGS",
                "train_examples": len(self.probe_train[0]),
                "test_examples": len(self.probe_test[0]),
                "split": "every fifth labelled record held out",
                "classes": self.probe_classes,
            }
            if "accuracy" in self.metrics
            else None,
            "latency": {
                **latency.model_dump(),
                "peak_memory": "weight bytes + peak extra memory of one forward pass "
                + ("(CUDA max_memory_allocated)" if self.device.type == "cuda" else "(peak RSS)"),
            }
            if "latency" in self.metrics
            else None,
        }

    @torch.inference_mode()
    def measure(
        self,
        model: nn.Module,
        *,
        folder: Path | None,
        on_step: Callable[[], None] | None = None,
        only: tuple[str, ...] | None = None,
        on_progress: ProgressFn | None = None,
    ) -> dict:
        """Run every metric on `model` (or those of them named in `only`); `folder` holds its
        weight files, for `size`. `on_step` is called between forward passes: it may raise to stop
        the measurement (cancellation). `on_progress(done, total, detail)` follows every forward
        pass (every block of a streamed model), counted over the whole measurement."""
        self._on_step = on_step
        model_device = next(model.parameters()).device
        # A device without an index ("cuda") means the current one, where "cuda:0" models live.
        if model_device.type != self.device.type or self.device.index not in (
            None,
            model_device.index,
        ):
            raise ValueError(
                f"the model is on {model_device} but this evaluator measures on {self.device}; "
                "evaluate baseline and result on the same device (CPU for dynamic int8)"
            )
        results: dict = {}
        wanted = [metric for metric in self.metrics if only is None or metric in only]
        self._on_progress, self._done = on_progress, 0
        self._total = self._steps(model, wanted)
        if "perplexity" in wanted:
            results["perplexity"] = self._perplexity(model)
        if "embedding_cosine" in wanted:
            results.update(self._embedding_cosine(model))
        if "accuracy" in wanted:
            results.update(self._accuracy(model))
        if "latency" in wanted:
            results.update(self._latency(model))
        if "size" in wanted:
            results.update(self._size(model, folder))
        return results

    def baseline_state(self) -> dict[str, torch.Tensor]:
        """What the first `measure` left for the later ones to compare with: the baseline's
        sentence embeddings and the accuracy probe fitted on them (empty when neither applies)."""
        state = {}
        if self._baseline_embeddings is not None:
            state["embeddings"] = self._baseline_embeddings.contiguous()
        if self._probe is not None:
            state["probe.weight"] = self._probe.weight.detach().contiguous()
            state["probe.bias"] = self._probe.bias.detach().contiguous()
        return state

    def restore_baseline_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take `baseline_state` from an earlier evaluator with the same settings, data and
        model (`workers.baseline_cache`), as if this one had measured the baseline."""
        if "embedding_cosine" in self.metrics:
            self._baseline_embeddings = state["embeddings"]
        if "accuracy" in self.metrics:
            weight = state["probe.weight"]
            probe = nn.Linear(weight.shape[1], weight.shape[0])
            probe.weight.data.copy_(weight)
            probe.bias.data.copy_(state["probe.bias"])
            self._probe = probe.requires_grad_(False)

    def _steps(self, model: nn.Module, wanted: list[str]) -> int:
        """The forward passes `measure` reports (a streamed model: one step per block and batch
        of passes, the passes of one block running together)."""
        store = store_of(model)

        def passes(count: int) -> int:
            return len(store) if store is not None else count

        total = 0
        if "perplexity" in wanted:
            total += passes(len(self.windows))
        if "embedding_cosine" in wanted:
            total += passes(_batches(len(self.embedding_texts)))
        if "accuracy" in wanted:
            if self._probe is None:
                total += passes(_batches(len(self.probe_train[0])))
            total += passes(_batches(len(self.probe_test[0])))
        if "latency" in wanted and store is None:
            latency = self.settings.latency
            total += latency.warmup + latency.runs + 1
        return total

    def work_tokens(self, only: tuple[str, ...] | None = None) -> int:
        """About how many tokens `measure` sends through a model: the size of its work, for
        weighing it against a job's other phases (`workers.progress_plan`)."""
        wanted = [metric for metric in self.metrics if only is None or metric in only]
        tokens = 0
        per_text = self.text_tokens / len(self.texts)
        if "perplexity" in wanted:
            tokens += sum(ids.numel() for ids, _ in self.windows)
        if "embedding_cosine" in wanted:
            tokens += round(per_text * len(self.embedding_texts))
        if "accuracy" in wanted:
            tokens += round(per_text * (len(self.probe_train[0]) + len(self.probe_test[0])))
        if "latency" in wanted:
            latency = self.settings.latency
            tokens += (latency.warmup + latency.runs + 1) * latency.batch_size * latency.seq_len
        return tokens

    def _advance(self, detail: str) -> None:
        self._done = min(self._done + 1, self._total)
        if self._on_progress is not None:
            self._on_progress(self._done, self._total, detail)

    @staticmethod
    def delta(baseline: dict, compressed: dict) -> dict:
        """compressed - baseline and compressed / baseline for every number both report."""

        def number(value) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)

        return {
            key: {
                "difference": compressed[key] - baseline[key],
                "ratio": compressed[key] / baseline[key] if baseline[key] else None,
            }
            for key in baseline
            if key in compressed and number(baseline[key]) and number(compressed[key])
        }

    def _check_length(self, model: nn.Module, length: int, what: str) -> None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise ValueError(f"{what} seq_len {length} exceeds the model's {limit} positions")

    def _perplexity(self, model: nn.Module) -> float:
        self._check_length(model, self.settings.seq_len, "perplexity")

        def window_nll(index: int, output) -> tuple[float, int]:
            # Position t predicts token t+1; the sum (not the mean) weights windows by tokens.
            targets = self.windows[index][1][0, 1:].to(self.device)
            nll = F.cross_entropy(
                output.logits[0, :-1].float(), targets, ignore_index=-100, reduction="sum"
            )
            return nll.item(), int((targets != -100).sum())

        calls = [{"input_ids": ids.to(self.device), "use_cache": False} for ids, _ in self.windows]
        scored = self._forward_each(model, calls, window_nll, unit="window")
        return math.exp(sum(nll for nll, _ in scored) / sum(tokens for _, tokens in scored))

    def _forward_each(
        self, model: nn.Module, calls: list[dict], finish, *, entry=None, unit: str
    ) -> list:
        """`finish(i, entry(**calls[i]))` for every call (`entry`: the model, or a part of it such
        as its base model), each reported as one `unit` ("window 3/20"). A streamed model runs
        every call through one resident block at a time (`streaming.stream_forward`), so its
        evaluation needs one block of memory, not the model; it reports blocks."""
        entry = model if entry is None else entry
        store = store_of(model)
        if store is not None:
            blocks = len(store)
            entered = 0

            def block_step() -> None:  # called before each block: the one before it is done
                nonlocal entered
                self._step()
                if entered:
                    self._advance(f"block {entered}/{blocks} of {len(calls)} {unit}s")
                entered += 1

            results = stream_forward(model, calls, finish, on_step=block_step, entry=entry)
            self._advance(f"block {blocks}/{blocks} of {len(calls)} {unit}s")
            return results
        results = []
        for index, kwargs in enumerate(calls):
            self._step()
            results.append(finish(index, entry(**kwargs)))
            self._advance(f"{unit} {index + 1}/{len(calls)}")
        return results

    def _probe_split(self, records: list[dict]) -> None:
        """`accuracy` is a linear probe: fitted once on the baseline's embeddings of 80% of the
        labelled texts, then applied to every model's embeddings of the other 20%. The split is
        fixed (every fifth record is held out), so the baseline and the result see the same texts."""
        self._probe: nn.Linear | None = None
        if "accuracy" not in self.metrics:
            return
        labelled = [
            (r["text"], str(r["label"]))
            for r in records
            if r.get("label") is not None and r["text"].strip()
        ]
        classes = sorted({label for _, label in labelled})
        if len(labelled) < 10 or len(classes) < 2:
            raise ValueError(
                "accuracy needs a labelled dataset (JSONL records with a 'label'), "
                "at least 10 records and 2 classes"
            )
        index = {label: i for i, label in enumerate(classes)}
        held_out = [pair for i, pair in enumerate(labelled) if i % 5 == 4]
        training = [pair for i, pair in enumerate(labelled) if i % 5 != 4]
        self.probe_classes = classes
        self.probe_train = ([t for t, _ in training], torch.tensor([index[y] for _, y in training]))
        self.probe_test = ([t for t, _ in held_out], torch.tensor([index[y] for _, y in held_out]))

    def _accuracy(self, model: nn.Module) -> dict:
        test_texts, test_labels = self.probe_test
        if self._probe is None:
            train_texts, train_labels = self.probe_train
            self._probe = _fit_probe(
                self._embeddings(model, train_texts), train_labels, len(self.probe_classes)
            )
        logits = self._probe(self._embeddings(model, test_texts).clone())
        correct = (logits.argmax(-1) == test_labels).float()
        return {"accuracy": correct.mean().item(), "accuracy_examples": len(test_texts)}

    def _embeddings(self, model: nn.Module, texts: list[str] | None = None) -> torch.Tensor:
        texts = self.embedding_texts if texts is None else texts
        calls = []
        for start in range(0, len(texts), EMBEDDING_BATCH_SIZE):
            batch = self.tokenizer(
                texts[start : start + EMBEDDING_BATCH_SIZE],
                padding=True,
                truncation=True,
                max_length=self.embedding_len,
                return_tensors="pt",
            )
            calls.append(
                {
                    "input_ids": batch["input_ids"].to(self.device),
                    "attention_mask": batch["attention_mask"].to(self.device),
                }
            )

        def pooled(index: int, output) -> torch.Tensor:
            hidden = output.last_hidden_state.float()
            weights = calls[index]["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            return F.normalize(mean, dim=-1).cpu()

        # The hidden states, without an LM head on top.
        return torch.cat(
            self._forward_each(model, calls, pooled, entry=model.base_model, unit="batch")
        )

    def _embedding_cosine(self, model: nn.Module) -> dict:
        self._check_length(model, self.embedding_len, "embedding")
        embeddings = self._embeddings(model)
        if self._baseline_embeddings is None:
            self._baseline_embeddings = embeddings
        cosine = (embeddings * self._baseline_embeddings).sum(-1)
        return {
            "embedding_cosine": cosine.mean().item(),
            "embedding_cosine_min": cosine.min().item(),
        }

    def _latency(self, model: nn.Module) -> dict:
        if store_of(model) is not None:
            # Never a made-up number: a model streamed block by block is not the deployed form.
            return {
                "latency": "not_measured",
                "latency_reason": "the model is larger than this worker's memory budget and was "
                "run one block at a time; deploy it where it fits to measure latency",
            }
        latency = self.settings.latency
        self._check_length(model, latency.seq_len, "latency")
        ids = self.latency_input.to(self.device)
        kwargs = {"use_cache": False} if self.task == "causal-lm" else {}
        for run in range(latency.warmup):
            self._step()
            model(input_ids=ids, **kwargs)
            self._advance(f"latency warm-up {run + 1}/{latency.warmup}")
        timings = []
        for run in range(latency.runs):
            self._step()
            self._synchronize()
            started = time.perf_counter()
            model(input_ids=ids, **kwargs)
            self._synchronize()
            timings.append(time.perf_counter() - started)
            self._advance(f"latency run {run + 1}/{latency.runs}")
        extra = _forward_extra_bytes(lambda: model(input_ids=ids, **kwargs), self.device)
        self._advance("peak memory")
        summary = latency_summary(timings)
        return {
            **summary,
            "tokens_per_s": ids.numel() / (summary["latency_ms_p50"] / 1000),
            # Weights plus working memory: what a process serving this model needs at least.
            "peak_memory_bytes": tensor_bytes(model) + extra,
        }

    def _step(self) -> None:
        if self._on_step is not None:
            self._on_step()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _size(self, model: nn.Module, folder: Path | None) -> dict:
        """`parameters`: the model's logical weights, whatever the format packs them into.
        `bits_per_weight`: the bits that hold its Linear layers' weights (values, scales, zero
        points, masks) per weight of theirs, so 4-bit codes in groups of 64 with float32 scales
        are 4.5. `bits_per_parameter`: the whole size (embeddings included) per parameter."""
        linears = linear_layer_names(model)
        if folder is not None:
            census = weight_census(Path(folder), linears)
            size = sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
            source, parameters = "weight files", census.parameters
            bits_per_weight = census.bits_per_weight
        else:
            size, source, parameters = (
                tensor_bytes(model),
                "in-memory tensors",
                parameter_count(model),
            )
            weights = sum(_logical_weights(model.get_submodule(name)) for name in linears)
            held = sum(_weight_bytes(model.get_submodule(name)) for name in linears)
            bits_per_weight = 8 * held / weights if weights else None
        return {
            "size_bytes": size,
            "size_source": source,
            "parameters": parameters,
            "bits_per_weight": bits_per_weight,
            "bits_per_parameter": 8 * size / parameters if parameters else None,
        }


def _batches(texts: int) -> int:
    return -(-texts // EMBEDDING_BATCH_SIZE)


def _fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> nn.Linear:
    """Multinomial logistic regression, L2-regularised, by L-BFGS from zero weights: deterministic,
    and with a convex loss the same optimum whatever the start."""
    with torch.inference_mode(False), torch.enable_grad():
        features = features.clone().float()
        probe = nn.Linear(features.shape[1], num_classes)
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        optimizer = torch.optim.LBFGS(
            probe.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(features), labels) + 1e-3 * probe.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    probe.requires_grad_(False)
    return probe


def linear_layer_names(model: nn.Module) -> list[str]:
    """The model's Linear layers, in any of the forms they run as (float, torch's int8, the
    runtime modules of `runtime/`): every module with integer `in_features` and `out_features`."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    ]


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias() if callable(bias) else bias  # torch's int8 Linear has bias()


def _holds_weight_parameter(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def _logical_weights(module: nn.Module) -> int:
    return module.in_features * module.out_features


def _weight_bytes(module: nn.Module) -> int:
    """Bytes holding a Linear layer's weight in memory (its values, scales and zeros; not its
    bias), whatever module runs it."""
    if isinstance(module, nnqd.Linear):  # packed params, neither parameters nor buffers
        weight = module.weight()
        scales = 1 if weight.qscheme() == torch.per_tensor_affine else weight.shape[0]
        return weight.numel() + 4 * scales
    bias = _bias(module)
    return sum(
        tensor.numel() * tensor.element_size()
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if tensor is not bias
    )


def parameter_count(model: nn.Module) -> int:
    """The model's logical weights, tied ones once: its parameters, plus the [out, in] weight and
    the bias of every Linear that holds them in another form (torch's int8 Linear, the int4 /
    int8 / FP8 runtime modules, whose weights are packed buffers)."""
    count = sum(parameter.numel() for parameter in model.parameters())
    for name in linear_layer_names(model):
        module = model.get_submodule(name)
        if not _holds_weight_parameter(module):
            bias = _bias(module)
            count += _logical_weights(module)
            if bias is not None and not isinstance(bias, nn.Parameter):
                count += bias.numel()
    return count


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights in memory: parameters and buffers (int8 values and their
    float32 scales for torch's int8 Linear, whose packed weights are neither)."""
    total = sum(tensor.numel() * tensor.element_size() for tensor in model.parameters())
    total += sum(tensor.numel() * tensor.element_size() for tensor in model.buffers())
    for module in model.modules():
        if isinstance(module, nnqd.Linear):
            bias = module.bias()
            total += _weight_bytes(module) + (bias.numel() * 4 if bias is not None else 0)
    return total


# (p90 - p10) / p50 above which a latency measurement is flagged noisy: on an idle machine
# repeated forward passes of one input vary by a few percent; more means something else ran.
NOISY_SPREAD = 0.25


def latency_summary(timings: list[float]) -> dict:
    """Percentiles of one forward pass's wall time (`timings`, seconds) in ms, their spread
    ((p90 - p10) / p50) and the number of runs; `latency_noisy` (with `latency_warning`) when the
    spread exceeds NOISY_SPREAD, i.e. the machine was busy and the number may not repeat."""
    ordered = sorted(timings)
    p10, p50, p90, p95 = (_percentile(ordered, percent) for percent in (10, 50, 90, 95))
    spread = (p90 - p10) / p50 if p50 else 0.0
    summary = {
        "latency_ms_p10": p10 * 1000,
        "latency_ms_p50": p50 * 1000,
        "latency_ms_p90": p90 * 1000,
        "latency_ms_p95": p95 * 1000,
        "latency_runs": len(ordered),
        "latency_spread": spread,
        "latency_noisy": spread > NOISY_SPREAD,
    }
    if summary["latency_noisy"]:
        summary["latency_warning"] = (
            f"latency varied by {spread:.0%} of the median over {len(ordered)} runs "
            f"(p10 {p10 * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms): the machine was busy, so the "
            "number may not repeat; compare baseline and compressed with care"
        )
    return summary


def _percentile(ordered: list[float], percent: float) -> float:
    # Nearest rank: the smallest sample with at least `percent`% of the samples at or below it.
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def _forward_extra_bytes(forward, device: torch.device) -> int:
    """The most memory one call of `forward` needs above what is resident before it.

    On CUDA that is the allocator's peak. On Linux CPU, freed heap memory is first handed back to
    the OS (glibc malloc_trim) and the kernel's peak-RSS counter (VmHWM) reset by writing 5 to
    /proc/self/clear_refs, so the peak belongs to this call alone. Elsewhere it is 0 unless the call
    raises the process's lifetime peak (ru_maxrss): an under-estimate, never an over-estimate.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    process_memory.trim()
    process_memory.reset_peak()
    before = _resident_bytes()
    forward()
    return max(0, _peak_resident_bytes() - before)


def _resident_bytes() -> int:
    current = process_memory.status_bytes("VmRSS")
    return current if current is not None else _peak_resident_bytes()


def _peak_resident_bytes() -> int:
    peak = process_memory.status_bytes("VmHWM")
    if peak is not None:
        return peak
    # ru_maxrss is in bytes on macOS, kilobytes elsewhere.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024
