"""The model card (README.md) of an artifact: what a person reads before using it.

Hugging Face front matter (base model, library, license where known, pipeline tag, tags), then a
title with the source model's name, a headline table (size, quality and speed against the original,
with the settings they were measured under), warnings when quality dropped a lot, what the recipe
changed and what stayed float (and why), how to load the folder in each tool, its storage layout
and where it came from. The full record (every metric and setting, versions, file hashes) is
`slimformer.json`; the card says only what a reader decides on.

Everything here is text built from the facts the export already has: config.json, the recipe, the
metrics and the job's inputs. The same facts give the same bytes (no timestamps, sorted keys).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from workers.compression import formats, runtimes
from workers.compression.architectures import matches
from workers.compression.recipe import Stage, StageConfig

# Quality drops past which the card warns the reader before anything else.
PERPLEXITY_WARNING_RATIO = 1.10  # perplexity 10% above the original's
COSINE_WARNING = 0.95  # mean embedding cosine to the original
ACCURACY_WARNING_DROP = 0.05  # five points of probe accuracy

PIPELINE_TAGS = {"causal-lm": "text-generation", "feature-extraction": "feature-extraction"}
TASK_WORDS = {"causal-lm": "a causal language model", "feature-extraction": "an encoder"}

SLIMFORMER_LOAD = (
    "```python\nfrom workers.compression.export import load_artifact\n\n"
    'loaded = load_artifact("path/to/this/folder")\n'
    'outputs = loaded.model(**loaded.tokenizer("Hello", return_tensors="pt"))\n```'
)

_STAGE = TypeAdapter(Stage)


def model_card(
    architecture: str,
    task: str,
    config: dict,
    *,
    recipe: dict,
    metrics: dict,
    inputs: dict,
    source: dict | None = None,
    sentence_transformers: bool = False,
) -> str:
    """README.md of an artifact whose config.json is `config`. `inputs`: the job's provenance
    (`model_name`, `base_model`, `license` where known); `source`: the source model card's front
    matter, for what the job does not know (its license, language); `sentence_transformers`:
    whether the folder holds sentence-transformers files."""
    quantization = config.get("quantization_config")
    layout, storage_format = formats.layout_reading(quantization)
    model_class = "AutoModelForCausalLM" if task == "causal-lm" else "AutoModel"
    described, how = layout.describe(quantization, model_class, SLIMFORMER_LOAD)
    stages = _stages(recipe)
    summaries = metrics.get("stages") if isinstance(metrics.get("stages"), list) else []
    name = inputs.get("model_name") or architecture
    methods = " + ".join(stage.method for stage in stages)
    front = _front_matter(
        task, stages, storage_format, inputs, source or {}, sentence_transformers, quantization
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=100).rstrip(),
        "---",
        "",
        f"# {name}" + (f" ({methods})" if methods else "") + ", compressed with Slimformer",
        "",
        (f"`{name}` (`{architecture}`, " if name != architecture else f"A `{architecture}` (")
        + f"{TASK_WORDS.get(task, task)}) made smaller with Slimformer, stored as "
        f"`{storage_format}`.",
        "",
        *_headline(metrics),
        *_warnings(metrics),
        "## What was changed",
        "",
        *(
            [f"{i}. {_in_words(s, _at(summaries, i - 1))}" for i, s in enumerate(stages, 1)]
            or ["The recipe is recorded in `slimformer.json`."]
        ),
        "",
        "## What stayed in float",
        "",
        *_stayed_float(quantization, stages),
        "",
        "## How to load",
        "",
        how,
        "",
        *(_sentence_transformers_load(quantization) if sentence_transformers else []),
        *(_vllm_load(task) if layout.plain_transformers else []),
        *runtimes.markdown(quantization),
        "## Storage layout",
        "",
        described,
        "",
        "## Provenance",
        "",
        _json_block(inputs),
        "",
        "Recipe:",
        "",
        _json_block(recipe),
        "",
        "`slimformer.json` holds the recipe, every metric with its settings, the library versions "
        "and the sha256 of every file.",
        "",
    ]
    return "\n".join(lines)


def read_front_matter(folder: Path) -> dict:
    """The YAML front matter of `folder`'s README.md (a source model's card), {} if none. Read
    with yaml.safe_load: plain data, never objects."""
    path = Path(folder) / "README.md"
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    head, separator, _ = text[3:].partition("\n---")
    if not separator:
        return {}
    try:
        front = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return front if isinstance(front, dict) else {}


# --- front matter -------------------------------------------------------------------------------


def _front_matter(
    task: str,
    stages: list[StageConfig],
    storage_format: str,
    inputs: dict,
    source: dict,
    sentence_transformers: bool,
    quantization: dict | None,
) -> dict:
    front: dict = {}
    base_model = inputs.get("base_model")
    if base_model:
        front["base_model"] = base_model
        if any(stage.family is not None for stage in stages):
            front["base_model_relation"] = "quantized"
    front["library_name"] = "sentence-transformers" if sentence_transformers else "transformers"
    license_ = inputs.get("license") or source.get("license")
    if isinstance(license_, str) and license_:
        front["license"] = license_
    language = source.get("language")
    if isinstance(language, str | list) and language:
        front["language"] = language
    front["pipeline_tag"] = (
        "sentence-similarity" if sentence_transformers else PIPELINE_TAGS.get(task, task)
    )
    tags = ["slimformer"]
    if quantization is not None:
        tags.append("compressed-tensors")
    tags.append(storage_format)
    for stage in stages:
        tags.extend([stage.method, *_stage_tags(stage)])
    if sentence_transformers:
        tags.append("sentence-transformers")
    front["tags"] = list(dict.fromkeys(tags))
    return front


def _stage_tags(stage: StageConfig) -> list[str]:
    method = stage.method
    if method in ("dynamic_int8", "w8a8"):
        return ["int8", "8-bit"]
    if method in ("rtn", "gptq", "awq"):
        return [f"int{stage.bits}", f"{stage.bits}-bit"]
    if method == "fp8":
        return ["fp8", "8-bit"]
    if method in ("magnitude", "wanda", "sparsegpt"):
        return ["pruned", "sparse" if stage.pattern == "unstructured" else "2:4-sparse"]
    if method == "structured":
        return ["pruned"]
    if method == "distill":
        return ["distilled"]
    return []


# --- the headline table -------------------------------------------------------------------------


def _headline(metrics: dict) -> list[str]:
    baseline, compressed = metrics.get("baseline"), metrics.get("compressed")
    if not isinstance(baseline, dict) or not isinstance(compressed, dict):
        return []
    settings = metrics.get("settings") if isinstance(metrics.get("settings"), dict) else {}
    latency = settings.get("latency") if isinstance(settings.get("latency"), dict) else {}
    shape = (
        f" (batch {latency.get('batch_size')} × {latency.get('seq_len')} tokens)"
        if latency.get("batch_size") and latency.get("seq_len")
        else ""
    )
    rows = [
        ("Size on disk", "size_bytes", _bytes, _ratio),
        ("Bits per Linear weight", "bits_per_weight", _number(3), _ratio),
        ("Parameters", "parameters", _count, _ratio),
        ("Sparsity", "sparsity", _percent, _points),
        ("Perplexity (lower is better)", "perplexity", _number(4), _relative),
        ("Embedding cosine to the original", "embedding_cosine", _number(4), None),
        ("Lowest embedding cosine", "embedding_cosine_min", _number(4), None),
        ("Probe accuracy", "accuracy", _percent, _points),
        (f"Latency, median{shape}", "latency_ms_p50", _milliseconds, _ratio),
        ("Tokens per second", "tokens_per_s", _number(4), _ratio),
        ("Peak memory", "peak_memory_bytes", _bytes, _ratio),
    ]
    table = ["| | original | this model | change |", "|---|---|---|---|"]
    for label, key, show, change in rows:
        before, after = _numeric(baseline.get(key)), _numeric(compressed.get(key))
        if after is None or (key == "sparsity" and not after):
            continue
        if key == "parameters" and before == after:
            continue
        difference = change(before, after) if change and before is not None else ""
        shown_before = show(before) if before is not None else "—"
        table.append(f"| {label} | {shown_before} | {show(after)} | {difference} |")
    if len(table) == 2:
        return []
    return [*table, "", _settings_sentence(metrics, settings), ""]


def _settings_sentence(metrics: dict, settings: dict) -> str:
    parts = []
    perplexity = settings.get("perplexity")
    if isinstance(perplexity, dict):
        parts.append(
            f"perplexity over {perplexity.get('windows')} windows of {perplexity.get('seq_len')} "
            f"tokens (stride {perplexity.get('stride')}, {perplexity.get('scored_tokens')} "
            "tokens scored)"
        )
    embedding = settings.get("embedding")
    if isinstance(embedding, dict):
        parts.append(
            f"embedding cosine over {embedding.get('texts')} texts of up to "
            f"{embedding.get('max_len')} tokens ({embedding.get('pooling', 'mean pooling')})"
        )
    accuracy = settings.get("accuracy")
    if isinstance(accuracy, dict):
        parts.append(
            f"accuracy of a linear probe on {accuracy.get('test_examples')} held-out examples"
        )
    latency = settings.get("latency")
    if isinstance(latency, dict):
        parts.append(
            f"latency as the median of {latency.get('runs')} runs after {latency.get('warmup')} "
            "warm-up run(s)"
        )
    where = [settings.get("device"), settings.get("device_name")]
    where_text = " / ".join(str(w) for w in where if w)
    if settings.get("num_threads"):
        where_text += f", {settings['num_threads']} threads"
    versions = ", ".join(
        f"{library} {settings[key]}"
        for library, key in (("torch", "torch_version"), ("transformers", "transformers_version"))
        if settings.get(key)
    )
    data = settings.get("dataset_id")
    sha = settings.get("dataset_sha256")
    sentence = "Both models measured by Slimformer on the same harness"
    if parts:
        sentence += ": " + "; ".join(parts)
    if data:
        sentence += f", on dataset `{data}`" + (f" (sha256 `{sha[:12]}…`)" if sha else "")
    if where_text:
        sentence += f", on {where_text}"
    if versions:
        sentence += f" ({versions})"
    sentence += "."
    measured_on = (metrics.get("compressed") or {}).get("measured_on")
    if measured_on:
        sentence += f" This model's numbers were measured on {measured_on}."
    return sentence + " Every setting is in `slimformer.json` (`metrics.settings`)."


def _warnings(metrics: dict) -> list[str]:
    baseline, compressed = metrics.get("baseline"), metrics.get("compressed")
    if not isinstance(baseline, dict) or not isinstance(compressed, dict):
        return []
    warnings, notes = [], []
    before, after = _numeric(baseline.get("perplexity")), _numeric(compressed.get("perplexity"))
    if before and after and after / before > PERPLEXITY_WARNING_RATIO:
        warnings.append(
            f"perplexity rose by {after / before - 1:.1%} ({before:.4g} → {after:.4g}), more "
            f"than {PERPLEXITY_WARNING_RATIO - 1:.0%}"
        )
    cosine = _numeric(compressed.get("embedding_cosine"))
    if cosine is not None and cosine < COSINE_WARNING:
        warnings.append(
            f"the embeddings' mean cosine to the original is {cosine:.4f}, below {COSINE_WARNING}"
        )
    before, after = _numeric(baseline.get("accuracy")), _numeric(compressed.get("accuracy"))
    if before is not None and after is not None and before - after > ACCURACY_WARNING_DROP:
        warnings.append(f"probe accuracy fell from {before:.1%} to {after:.1%}")
    targets = metrics.get("targets")
    if isinstance(targets, dict) and targets.get("met") is False:
        missed = [m for m, r in (targets.get("metrics") or {}).items() if not r.get("met")]
        warnings.append("the job's targets were not met: " + ", ".join(missed))
    before = _numeric(baseline.get("latency_ms_p50"))
    after = _numeric(compressed.get("latency_ms_p50"))
    if before and after and after > before:
        notes.append(
            f"this model ran slower than the original on the measuring device "
            f"({after:.1f} ms against {before:.1f} ms)"
        )
    if baseline.get("latency_noisy") or compressed.get("latency_noisy"):
        notes.append(
            "the latency measurement was noisy (the machine was busy): compare speeds with care"
        )
    lines = [
        f"> **Warning:** {text}; check the model on your own data before using it."
        for text in warnings
    ]
    lines += [f"> Note: {text}." for text in notes]
    return [line for text in lines for line in (text, "")]


# --- what changed, what did not -----------------------------------------------------------------


def _stages(recipe: dict) -> list[StageConfig]:
    stages = []
    for stage in (recipe or {}).get("stages") or []:
        try:
            stages.append(_STAGE.validate_python(stage))
        except ValidationError:
            continue
    return stages


def _in_words(stage: StageConfig, summary: dict) -> str:
    """One sentence on what `stage` did (`summary`: what the method reported, if known)."""
    method, layers = stage.method, summary.get("quantized_layers") or summary.get("pruned_layers")
    where = f" in {layers} Linear layers" if layers else ""
    if method == "dynamic_int8":
        scales = "one scale per output channel" if stage.per_channel else "one scale per tensor"
        text = (
            f"int8 weights ({scales}){where}, activations quantized to int8 at run time "
            "(`dynamic_int8`: PyTorch's dynamic quantization, CPU kernels)"
        )
    elif method == "w8a8":
        activations = (
            "one scale per token computed at run time"
            if stage.activations == "dynamic"
            else "one scale per layer calibrated in advance"
        )
        text = f"int8 weights (one scale per output channel) and int8 activations ({activations}){where} (`w8a8`)"
    elif method == "smoothquant":
        text = (
            f"activation outliers moved into the weights by an exact per-channel rescaling "
            f"(SmoothQuant, α = {stage.alpha}), so that int8 activations lose less"
        )
    elif method in ("rtn", "gptq", "awq"):
        groups = (
            "one scale per output channel"
            if stage.group_size == -1
            else f"in groups of {stage.group_size}"
        )
        how = {"rtn": "round to nearest", "gptq": "GPTQ", "awq": "AWQ"}[method]
        if method == "gptq" and stage.act_order:
            how += ", largest inputs first"
        zero = "symmetric" if stage.symmetric else "with zero points"
        text = f"{stage.bits}-bit weights {groups} ({how}, {zero}){where}; activations stay float"
    elif method == "fp8":
        activations = "stay float" if stage.activations == "none" else "are cast to FP8 per token"
        text = f"FP8 (E4M3) weights, one scale per output channel{where}; activations {activations}"
    elif method in ("magnitude", "wanda", "sparsegpt"):
        how = {"magnitude": "smallest magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
        pattern = " in a 2:4 pattern (2 of every 4 weights)" if stage.pattern == "2:4" else ""
        text = (
            f"{stage.sparsity:.0%} of the weights set to zero{pattern}{where}, chosen by "
            f"{how[method]}; the zeros are stored as they are"
        )
    elif method == "structured":
        parts = []
        if stage.ffn_channels:
            parts.append(f"{stage.ffn_channels:.0%} of the FFN channels removed")
        if stage.attention_heads:
            parts.append(f"{stage.attention_heads:.0%} of the attention heads removed")
        text = " and ".join(parts) + f" (scored by {stage.criterion}); the weight shapes shrink"
    elif method == "distill":
        student = stage.student
        if student is not None and student.num_layers is not None:
            into = f"a student keeping {student.num_layers} of the teacher's blocks"
        elif student is not None:
            into = f"model `{student.model_id}`"
        else:
            into = "the pruned model"
        text = f"knowledge distilled into {into} ({stage.steps} training steps)"
    else:
        text = f"`{method}`"
    samples = summary.get("calibration_samples")
    tokens = summary.get("calibration_tokens")
    if samples and tokens:
        text += f", calibrated on {samples} samples of {tokens // samples} tokens"
    if stage.ignore:
        text += "; left alone: " + ", ".join(f"`{pattern}`" for pattern in stage.ignore)
    return text[0].upper() + text[1:] + "."


def _stayed_float(quantization: dict | None, stages: list[StageConfig]) -> list[str]:
    if quantization is None or "config_groups" not in quantization:
        return [
            "Every weight is float32: the recipe quantizes nothing (pruning removes or zeroes "
            "weights, distillation trains them)."
        ]
    lines = []
    by_reason: dict[str, list[str]] = {}
    for name in quantization.get("ignore", []):
        by_reason.setdefault(_why_float(name, stages), []).append(name)
    for reason, names in sorted(by_reason.items()):
        shown = ", ".join(f"`{name}`" for name in names[:6])
        more = f" and {len(names) - 6} more" if len(names) > 6 else ""
        layers = "1 Linear layer" if len(names) == 1 else f"{len(names)} Linear layers"
        lines.append(f"- {layers} ({shown}{more}): {reason}.")
    lines.append(
        "- The embeddings, normalisation layers and biases: the methods quantize the weights of "
        "Linear layers, where the matrix multiplies are; embeddings are lookups and norms and "
        "biases are small."
    )
    return lines


def _why_float(name: str, stages: list[StageConfig]) -> str:
    quantizing = [stage for stage in stages if stage.family is not None]
    if any(matches(name, pattern) for stage in quantizing for pattern in stage.ignore):
        return "the recipe's `ignore` names them"
    if any(stage.modules is not None for stage in quantizing):
        return "the recipe's `modules` does not name them"
    if name.split(".")[0] == "lm_head":
        return (
            "the output head, outside the repeated blocks, which the default leaves in float: "
            "its logits are the most quantization-sensitive tensor, and it is usually tied to "
            "the embedding"
        )
    if "pooler" in name:
        return (
            "BERT's pooler, outside the repeated blocks, which the default leaves in float: "
            "mean-pooled sentence embeddings do not use it"
        )
    return "outside the repeated blocks, which the default leaves in float"


# --- how to load in the other tools -------------------------------------------------------------


def _sentence_transformers_load(quantization: dict | None) -> list[str]:
    lines = [
        "### sentence-transformers",
        "",
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        'model = SentenceTransformer("path/to/this/folder")\n'
        'embeddings = model.encode(["The first sentence.", "And another one."])\n```',
        "",
        "`modules.json` and the module folders are the source model's: the same pooling and "
        "normalisation.",
    ]
    if quantization is not None:
        lines[-1] += (
            " sentence-transformers loads the weights through transformers, dequantized to float32 "
            "while loading (`config_kwargs` in `sentence_bert_config.json`): the files stay "
            "compressed, the model in memory is float, and its embeddings differ from the "
            "original's by the weights' rounding only."
        )
    return [*lines, ""]


def _vllm_load(task: str) -> list[str]:
    if task == "causal-lm":
        code = 'llm = LLM(model="path/to/this/folder")\nprint(llm.generate(["Hello"]))'
    else:
        code = (
            'llm = LLM(model="path/to/this/folder", runner="pooling")\n'
            'print(llm.embed(["The first sentence."]))'
        )
    return [
        "### vLLM",
        "",
        f"```python\nfrom vllm import LLM\n\n{code}\n```",
        "",
        "vLLM reads the same config.json; what Slimformer measured there is in the table below.",
        "",
    ]


# --- formatting ---------------------------------------------------------------------------------


def _at(items: list, index: int) -> dict:
    item = items[index] if 0 <= index < len(items) else None
    return item if isinstance(item, dict) else {}


def _numeric(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _count(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def _number(digits: int):
    return lambda value: f"{value:.{digits}g}"


def _percent(value: float) -> str:
    return f"{value:.1%}"


def _milliseconds(value: float) -> str:
    return f"{value:.1f} ms"


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}×" if before else ""


def _relative(before: float, after: float) -> str:
    return f"{after / before - 1:+.1%}" if before else ""


def _points(before: float, after: float) -> str:
    return f"{100 * (after - before):+.1f} points"


def _json_block(value) -> str:
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n```"
