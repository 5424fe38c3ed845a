"""Small SmolLM2 / MiniLM artifacts of every export layout, for `bench.vllm_check` (project venv).

    .venv/bin/python -m bench.vllm_artifacts OUT_FOLDER [--layouts w8a8_static ...]

Each artifact is compressed with a short calibration (8 x 128 tokens of enwiki-calibration), saved
with `export.save_model`, and its perplexity measured by our runtime (`load_artifact` +
`Evaluator`) on the text `bench.vllm_check` scores (`evaluation_text`), written to
OUT/<layout>/slimformer_check.json as the number vLLM must reproduce.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from workers.compression import compress
from workers.compression.data import calibration_batches
from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
from workers.compression.export import load_artifact, save_model
from workers.compression.loading import load_model
from workers.compression.recipe import Recipe

SMOLLM2 = "SmolLM2-135M-Instruct"
MINILM = "all-MiniLM-L6-v2"
W4G64 = {"bits": 4, "group_size": 64}
LAYOUTS: dict[str, tuple[str, list[dict]]] = {
    "rtn": (SMOLLM2, [{"method": "rtn", **W4G64}]),
    "gptq": (SMOLLM2, [{"method": "gptq", **W4G64, "act_order": True}]),
    "awq": (SMOLLM2, [{"method": "awq", **W4G64}]),
    "w8a8_dynamic": (SMOLLM2, [{"method": "w8a8", "activations": "dynamic"}]),
    "w8a8_static": (
        SMOLLM2,
        [{"method": "smoothquant", "alpha": 0.5}, {"method": "w8a8", "activations": "static"}],
    ),
    "fp8_dynamic": (SMOLLM2, [{"method": "fp8", "activations": "dynamic"}]),
    "fp8_weight_only": (SMOLLM2, [{"method": "fp8", "activations": "none"}]),
    "minilm_dynamic_int8": (MINILM, [{"method": "dynamic_int8"}]),
}
SEQ_LEN = 128


def texts(name: str) -> list[str]:
    return [json.loads(line)["text"] for line in builtin_dataset_jsonl(name).splitlines()]


def evaluation_text() -> str:
    """The text every runtime scores: the first enwiki-evaluation paragraphs (over 256 tokens)."""
    return "\n\n".join(texts("enwiki-evaluation")[:6])


def sentences() -> list[str]:
    return texts("lee-sentences")[:16]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_tokens: int) -> float:
    """exp(mean next-token NLL) over the text's first `max_tokens` tokens, one window."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    logits = model(input_ids=ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(nll.item())


@torch.no_grad()
def embeddings(model, tokenizer, batch: list[str]) -> torch.Tensor:
    """Mean-pooled, normalized sentence embeddings (all-MiniLM-L6-v2's pooling)."""
    encoded = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=128)
    hidden = model(**encoded).last_hidden_state.float()
    mask = encoded.attention_mask.unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--cache", type=Path, help="where built-in models are converted")
    args = parser.parse_args()
    cache = args.cache or args.out / "_source"
    loaded_models = {}
    for layout in args.layouts:
        model_name, stages = LAYOUTS[layout]
        folder = args.out / layout
        if (folder / "slimformer_check.json").exists():
            continue
        if model_name not in loaded_models:
            loaded_models[model_name] = load_model(
                builtin_model_folder(model_name, cache), device="cpu"
            )
        source = loaded_models[model_name]
        calibration = calibration_batches(
            texts("enwiki-calibration") if model_name == SMOLLM2 else sentences(),
            source.tokenizer,
            num_samples=8,
            seq_len=SEQ_LEN,
            seed=0,
        )
        started = time.perf_counter()
        model = copy.deepcopy(source.model)
        recipe = Recipe.model_validate({"stages": stages})
        compress(model, recipe, calibration)
        save_model(
            source, model, folder, recipe=recipe.model_dump(mode="json"), metrics={}, inputs={}
        )
        del model
        runtime = load_artifact(folder, device="cpu")
        record = {
            "layout": layout,
            "model": model_name,
            "stages": stages,
            "compress_seconds": round(time.perf_counter() - started, 1),
        }
        if model_name == SMOLLM2:
            record["max_tokens"] = args.max_tokens
            record["input_ids"] = source.tokenizer(evaluation_text()).input_ids[: args.max_tokens]
            record["slimformer_perplexity"] = perplexity(
                runtime.model, source.tokenizer, evaluation_text(), args.max_tokens
            )
            record["fp32_perplexity"] = perplexity(
                source.model, source.tokenizer, evaluation_text(), args.max_tokens
            )
            # vLLM's CPU kernels run 4-bit and int8 layers in bf16: our runtime in bf16 (weights
            # dequantized by us, then rounded to bf16, bf16 activations) says how much of a
            # difference is bf16 rather than a reading of the file.
            record["slimformer_bf16_perplexity"] = perplexity(
                runtime.model.to(torch.bfloat16), source.tokenizer, evaluation_text(),
                args.max_tokens,
            )  # fmt: skip
            record["fp32_bf16_perplexity"] = perplexity(
                copy.deepcopy(source.model).to(torch.bfloat16), source.tokenizer,
                evaluation_text(), args.max_tokens,
            )  # fmt: skip
        else:
            ours = embeddings(runtime.model, source.tokenizer, sentences())
            reference = embeddings(source.model, source.tokenizer, sentences())
            record["slimformer_cosine_to_fp32"] = (ours * reference).sum(-1).mean().item()
            record["sentences"] = sentences()
            record["slimformer_embeddings"] = ours.tolist()
        (folder / "slimformer_check.json").write_text(json.dumps(record, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k != "slimformer_embeddings"}))


if __name__ == "__main__":
    main()
