"""Layer by layer: GPTQ in column order against RTN on the objective GPTQ minimises, on the
calibration inputs and on held-out ones, with the Hessian factored in float32 (ours) or float64.

For a few SmolLM2 blocks (inputs from the unquantized model), each targeted layer's relative output
error sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) is measured with H from the calibration windows and with H
from other windows of the same text (held out). A method that wins on calibration and loses held
out overfits the calibration tokens; a float64 factorization that changes the result would point
at precision.

    nice -n 10 .venv/bin/python -m bench.gptq_layers --blocks 0 3 10 20 29 --samples 8

Writes bench/results/gptq_layers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.gptq_grid import RESULTS, load, texts
from workers.compression.calibration import (
    block_layers,
    capture_block_inputs,
    input_hessians,
    model_blocks,
)
from workers.compression.data import calibration_batches
from workers.compression.methods.gptq import HessianFactor, gptq_quantize
from workers.compression.methods.rtn import weight_only_targets
from workers.compression.quant import dequantize, quantize_groups
from workers.compression.recipe import GptqConfig


def factor_float64(H: torch.Tensor, damping: float) -> HessianFactor:
    """`inverse_hessian_factor` (column order) with every step in float64, U cast to float32."""
    K = H.double().flip((0, 1)).clone()  # J H J
    dead = K.diagonal() == 0
    K.diagonal()[dead] = 1
    shift = damping * K.diagonal().mean().item()
    K.diagonal().add_(shift)
    M = torch.linalg.cholesky(K)
    inverse = torch.linalg.solve_triangular(M, torch.eye(len(K), dtype=K.dtype), upper=False)
    U = inverse.flip((0, 1)).float()
    return HessianFactor(U=U, dead=dead.flip(0), order=torch.arange(len(K)), damping=shift)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    W, delta, H = W.double(), (W - W_hat).double(), H.double()
    return ((delta @ H * delta).sum() / (W @ H * W).sum()).sqrt().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 3, 10, 20, 29])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=Path(".slimformer/bench-cache"))
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load(args.model, args.cache_dir)
    model = loaded.model
    corpus = texts("enwiki-calibration")
    sets = {
        seed: calibration_batches(
            corpus, loaded.tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=seed
        )
        for seed in (0, 1)  # 0: calibration, 1: held out
    }
    config = GptqConfig(method="gptq", bits=4, group_size=64, act_order=False)
    targeted, _ = weight_only_targets(model, config)
    name, blocks = model_blocks(model)
    inputs = {seed: capture_block_inputs(model, batch) for seed, batch in sets.items()}
    rows = []
    with torch.no_grad():
        for index, block in enumerate(blocks):
            if index > max(args.blocks):
                break
            if index in args.blocks:
                layers = block_layers(f"{name}.{index}", block, targeted)
                hessians = {seed: input_hessians(block, layers, inputs[seed]) for seed in inputs}
                for layer_name, layer in layers.items():
                    W = layer.weight.detach().float()
                    H, H_out = hessians[0][layer_name], hessians[1][layer_name]
                    rtn = dequantize(
                        quantize_groups(W, bits=4, group_size=64, symmetric=True, layer=layer_name)
                    ).float()
                    row = {"layer": f"{name}.{index}.{layer_name}", "rtn": {}, "gptq": {},
                           "gptq_float64_factor": {}}  # fmt: skip
                    factor64 = factor_float64(H, 0.01)
                    for key, factor in (("gptq", H), ("gptq_float64_factor", factor64)):
                        q = gptq_quantize(
                            W, factor, bits=4, group_size=64, symmetric=True, act_order=False,
                            damping=0.01, block_size=128, layer=layer_name,
                        )  # fmt: skip
                        W_hat = dequantize(q).float()
                        row[key] = {
                            "calibration": output_error(W, W_hat, H),
                            "held_out": output_error(W, W_hat, H_out),
                        }
                    row["rtn"] = {
                        "calibration": output_error(W, rtn, H),
                        "held_out": output_error(W, rtn, H_out),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            for batch in inputs.values():
                batch.advance(block)
    body = {
        "command": "nice -n 10 .venv/bin/python -m bench.gptq_layers " + " ".join(sys.argv[1:]),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": args.model,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptq_layers.json").write_text(json.dumps(body, indent=2) + "\n")
    lines = [
        "# GPTQ (column order) vs RTN per layer, 4-bit g64, relative output error",
        "",
        f"Reproduce: `{body['command']}` ({body['finished_at']}). Calibration: {args.samples} x "
        f"{args.seq_len} enwiki-calibration windows (seed 0); held out: seed 1. Lower is better.",
        "",
        "| layer | RTN calib. | GPTQ calib. | GPTQ f64 calib. | RTN held out | GPTQ held out "
        "| GPTQ f64 held out |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layer']} | {row['rtn']['calibration']:.4f} | {row['gptq']['calibration']:.4f}"
            f" | {row['gptq_float64_factor']['calibration']:.4f} | {row['rtn']['held_out']:.4f}"
            f" | {row['gptq']['held_out']:.4f} | {row['gptq_float64_factor']['held_out']:.4f} |"
        )
    (RESULTS / "gptq_layers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
