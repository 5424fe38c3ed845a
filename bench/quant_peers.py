"""Slimformer's methods side by side with llm-compressor, torchao and torch.ao on this machine:
the same model, the same calibration token ids and the same evaluation code for every library.
Writes bench/results/quant_peers.{json,md}.

    .venv/bin/python -m bench.quant_peers                      # everything, full size (hours on 2 cores)
    .venv/bin/python -m bench.quant_peers --samples 4 --seq-len 128 --windows 2 --latency-runs 2
    .venv/bin/python -m bench.quant_peers --models smollm2 --only 'slimformer/*' 'llmcompressor/gptq*'
    .venv/bin/python -m bench.quant_peers --setup              # (re)create the peers' venv only

The peers live in their own venv, bench/.peers-venv, created on first use from
bench/peers-requirements.txt (the versions measured), with this project installed into it without
its dependencies: llm-compressor 0.14 pins transformers <= 5.17 and compressed-tensors 0.19, which
conflict with the project's pins, so the project's venv is never touched.

Every row runs in a fresh process (`bench.peers.worker`), so peak RSS (VmHWM, read right after
compressing) is that row's own. Calibration windows are cut once here by
`workers.compression.data.calibration_batches` (enwiki-calibration, seed 0) and handed to every
row as token ids. Quality is `workers.compression.evaluation.Evaluator`: perplexity on
enwiki-evaluation for SmolLM2, mean embedding cosine to FP32 on lee-sentences for MiniLM. Latency
is a full forward at 1 x 128 and 32 x 128 tokens, alternating with a float32 copy in the same
process, as median ratios. A Slimformer method that is not registered yet is recorded as skipped;
rerun with `--only` when it lands (rows of an earlier run with the same settings are kept).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
PEERS_VENV = BENCH / ".peers-venv"
PEERS_REQUIREMENTS = BENCH / "peers-requirements.txt"
# Installed before the rest so that pip keeps the CPU build this machine has instead of resolving
# a multi-GB CUDA one for the peers' loose torch requirement.
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Row:
    name: str
    library: str
    settings: str  # in words, for the table
    options: dict = field(default_factory=dict)
    venv: str = "main"  # "main": the project's venv; "peers": bench/.peers-venv


def _slim(name: str, settings: str, *stages: dict) -> Row:
    return Row(f"slimformer/{name}", "slimformer", settings, {"stages": list(stages)})


def _llmc(name: str, settings: str, kind: str, **options) -> Row:
    return Row(
        f"llmcompressor/{name}", "llm-compressor", settings, {"kind": kind, **options}, "peers"
    )


def _torchao(name: str, settings: str, config: str, **options) -> Row:
    return Row(f"torchao/{name}", "torchao", settings, {"config": config, **options}, "peers")


W4_G64 = {"bits": 4, "group_size": 64}
HALF = {"sparsity": 0.5}
ROWS: tuple[Row, ...] = (
    Row("fp32", "fp32", "float32, as loaded"),
    Row(
        "fp32@peers-venv",
        "fp32",
        "float32 in the peers' venv: the harness agrees there",
        venv="peers",
    ),
    _slim(
        "gptq-w4a16-g64-act-order",
        "int4 sym g64, act_order",
        {"method": "gptq", **W4_G64, "act_order": True},
    ),
    _slim("gptq-w4a16-g64", "int4 sym g64, column order", {"method": "gptq", **W4_G64}),
    _slim("rtn-w4a16-g64", "int4 sym g64", {"method": "rtn", **W4_G64}),
    _slim("awq-w4a16-g64", "int4 sym g64, grid 20", {"method": "awq", **W4_G64}),
    _slim(
        "smoothquant-w8a8-static",
        "alpha 0.5; int8 per-channel W, static per-tensor A",
        {"method": "smoothquant", "alpha": 0.5},
        {"method": "w8a8", "activations": "static"},
    ),
    _slim(
        "smoothquant-w8a8-dynamic",
        "alpha 0.5; int8 per-channel W, per-token A",
        {"method": "smoothquant", "alpha": 0.5},
        {"method": "w8a8", "activations": "dynamic"},
    ),
    _slim("dynamic-int8", "int8 per-channel W, dynamic A", {"method": "dynamic_int8"}),
    _slim("fp8", "fp8 e4m3 per-channel W", {"method": "fp8"}),
    _slim("magnitude-50", "50% unstructured", {"method": "magnitude", **HALF}),
    _slim("wanda-50", "50% unstructured", {"method": "wanda", **HALF}),
    _slim("sparsegpt-50", "50% unstructured", {"method": "sparsegpt", **HALF}),
    _slim("sparsegpt-2of4", "2:4", {"method": "sparsegpt", **HALF, "pattern": "2:4"}),
    _llmc("gptq-w4a16-g64", "int4 sym g64, actorder static (default)", "gptq-w4a16"),
    _llmc("gptq-w4a16-g64-no-act-order", "int4 sym g64, actorder off", "gptq-w4a16", actorder=None),
    _llmc("awq-w4a16-g64", "int4 sym g64, n_grid 20", "awq-w4a16"),
    _llmc(
        "smoothquant-gptq-w8a8",
        "strength 0.5; GPTQ int8 per-channel W, per-token A",
        "smoothquant-gptq-w8a8",
        smoothing_strength=0.5,
    ),
    _llmc(
        "smoothquant-rtn-w8a8",
        "strength 0.5; RTN int8 per-channel W, per-token A",
        "smoothquant-rtn-w8a8",
        smoothing_strength=0.5,
    ),
    _llmc("sparsegpt-50", "50% unstructured", "sparsegpt", **HALF, mask_structure="0:0"),
    _llmc("sparsegpt-2of4", "2:4", "sparsegpt", **HALF, mask_structure="2:4"),
    _llmc("wanda-50", "50% unstructured", "wanda", **HALF, mask_structure="0:0"),
    _llmc("magnitude-50", "50% unstructured", "magnitude", init_sparsity=0.5, final_sparsity=0.5),
    _torchao("int8-weight-only", "Int8WeightOnlyConfig", "int8-weight-only"),
    _torchao(
        "int8-dynamic-int8-weight",
        "Int8DynamicActivationInt8WeightConfig",
        "int8-dynamic-activation-int8-weight",
    ),
    _torchao(
        "int4-weight-only-g64",
        "Int4WeightOnlyConfig(group_size=64)",
        "int4-weight-only",
        group_size=64,
    ),
    _torchao(
        "intx-int4-weight-only-g64",
        "IntxWeightOnlyConfig(int4, PerGroup(64)), symmetric",
        "intx-weight-only",
        weight_dtype="int4",
        group_size=64,
    ),
    Row("torch.ao/quantize-dynamic-int8", "torch.ao", "quantize_dynamic, per-channel qint8"),
)

# (Slimformer row, peer row): compared in the summary against the targets (quality at least the
# peer's, at most half its compression time, no more peak memory).
PAIRS = (
    ("slimformer/gptq-w4a16-g64-act-order", "llmcompressor/gptq-w4a16-g64"),
    ("slimformer/gptq-w4a16-g64", "llmcompressor/gptq-w4a16-g64-no-act-order"),
    ("slimformer/awq-w4a16-g64", "llmcompressor/awq-w4a16-g64"),
    ("slimformer/smoothquant-w8a8-dynamic", "llmcompressor/smoothquant-rtn-w8a8"),
    ("slimformer/smoothquant-w8a8-dynamic", "llmcompressor/smoothquant-gptq-w8a8"),
    ("slimformer/sparsegpt-50", "llmcompressor/sparsegpt-50"),
    ("slimformer/sparsegpt-2of4", "llmcompressor/sparsegpt-2of4"),
    ("slimformer/wanda-50", "llmcompressor/wanda-50"),
    ("slimformer/magnitude-50", "llmcompressor/magnitude-50"),
    ("slimformer/dynamic-int8", "torch.ao/quantize-dynamic-int8"),
    ("slimformer/dynamic-int8", "torchao/int8-dynamic-int8-weight"),
    ("slimformer/rtn-w4a16-g64", "torchao/intx-int4-weight-only-g64"),
)


PRUNING = ("magnitude", "wanda", "sparsegpt")


def run_priority(row: Row) -> int:
    """Run order: the baselines, then each compared pair back to back (so an interrupted run still
    has whole comparisons), then the rest; the report keeps the order of ROWS."""
    paired = [name for pair in PAIRS for name in pair]
    if row.library == "fp32":
        return -1
    return paired.index(row.name) if row.name in paired else len(paired)


@dataclass(frozen=True)
class BenchModel:
    key: str
    builtin: str
    metric: str  # "perplexity" or "embedding_cosine"
    evaluation: str  # built-in dataset


MODELS = {
    model.key: model
    for model in (
        BenchModel("smollm2", "SmolLM2-135M-Instruct", "perplexity", "enwiki-evaluation"),
        BenchModel("minilm", "all-MiniLM-L6-v2", "embedding_cosine", "lee-sentences"),
    )
}
CALIBRATION_DATASET = "enwiki-calibration"
SEED = 0


# --- the peers' venv --------------------------------------------------------------------------


def venv_python(venv: str) -> Path:
    return Path(sys.executable) if venv == "main" else PEERS_VENV / "bin" / "python"


def peers_ready() -> bool:
    python = venv_python("peers")
    if not python.exists():
        return False
    probe = "import llmcompressor, torchao, workers.compression.evaluation"
    return subprocess.run([python, "-c", probe], cwd=REPO, capture_output=True).returncode == 0


def setup_peers_venv() -> None:
    """Create bench/.peers-venv (if missing) and install the pinned peers and this project."""
    if not venv_python("peers").exists():
        print(f"creating {PEERS_VENV.relative_to(REPO)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", PEERS_VENV], check=True)
    pip = [venv_python("peers"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, "-r", PEERS_REQUIREMENTS], check=True)
    # Without dependencies: the peers' pins (transformers, compressed-tensors) stay as they are.
    subprocess.run([*pip, "--no-deps", "-e", REPO], check=True)


# --- inputs shared by every row ---------------------------------------------------------------


def prepare_inputs(model: BenchModel, args: argparse.Namespace, folder_for_inputs: Path) -> dict:
    """The model folder, the calibration token ids (made once, here) and the evaluation records."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from workers.compression.data import calibration_batches
    from workers.compression.examples import builtin_dataset_jsonl, builtin_model_folder
    from workers.compression.loading import load_tokenizer, read_architecture, task_of

    folder = builtin_model_folder(model.builtin, args.cache_dir)
    tokenizer = load_tokenizer(folder, task_of(read_architecture(folder)))
    texts = [
        json.loads(line)["text"] for line in builtin_dataset_jsonl(CALIBRATION_DATASET).splitlines()
    ]
    windows = calibration_batches(
        texts, tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=SEED
    )
    ids = torch.cat(windows)
    target = folder_for_inputs / model.key
    target.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, target / "calibration.safetensors")
    records = builtin_dataset_jsonl(model.evaluation)
    (target / "evaluation.jsonl").write_bytes(records)
    return {
        "name": model.builtin,
        "folder": str(folder),
        "calibration": str(target / "calibration.safetensors"),
        "calibration_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "evaluation_records": str(target / "evaluation.jsonl"),
        "evaluation_dataset": model.evaluation,
        "evaluation_sha256": hashlib.sha256(records).hexdigest(),
    }


# --- running rows -----------------------------------------------------------------------------


def run_row(
    row: Row, model: BenchModel, inputs: dict, args: argparse.Namespace, work: Path
) -> dict:
    stem = f"{model.key}__{row.name.replace('/', '__')}"
    spec = {
        "library": row.library,
        "options": row.options,
        "model": inputs,
        "evaluation": {
            "metric": model.metric,
            "seq_len": args.seq_len,
            "windows": args.windows,
            "texts": args.embedding_texts,
        },
        "latency": {
            "shapes": args.latency_shapes,
            "runs": args.latency_runs,
            "warmup": args.latency_warmup,
        },
        "work_dir": str(work),
    }
    spec_path, result_path, log_path = (
        work / f"{stem}.{ext}" for ext in ("spec.json", "result.json", "log")
    )
    spec_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = [
        str(venv_python(row.venv)),
        "-m",
        "bench.peers.worker",
        str(spec_path),
        str(result_path),
    ]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            process = subprocess.run(
                command,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.row_timeout,
            )
            returncode = process.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    wall = time.perf_counter() - started
    if result_path.exists():
        result = json.loads(result_path.read_text(encoding="utf-8"))
    else:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        why = (
            f"timed out after {args.row_timeout} s"
            if returncode is None
            else f"exit code {returncode}"
        )
        result = {"status": "failed", "error": f"the row's process died ({why})", "log_tail": tail}
    return {
        "model": model.key,
        "row": row.name,
        "library": row.library,
        "venv": row.venv,
        "settings": row.settings,
        "options": row.options,
        "process_wall_s": wall,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **result,
    }


# --- reporting --------------------------------------------------------------------------------


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model_name = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in cpuinfo.splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    memory = (
        next(
            (
                int(line.split()[1]) * 1024
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            ),
            None,
        )
        if Path("/proc/meminfo").exists()
        else None
    )
    return {
        "cpu": model_name,
        "logical_cpus": os.cpu_count(),
        "isa": [
            flag
            for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
            if flag in flags
        ],
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def venv_versions(venv: str) -> dict | None:
    python = venv_python(venv)
    if not python.exists():
        return None
    out = subprocess.run(
        [python, "-m", "bench.peers.worker", "--versions"], cwd=REPO, capture_output=True, text=True
    )
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def _mb(value) -> str:
    return "" if value is None else f"{value / 1e6:.0f}"


def _quality(row: dict, metric: str) -> str:
    quality = row.get("quality") or {}
    if metric == "perplexity":
        return f"{quality['perplexity']:.2f}" if "perplexity" in quality else ""
    if "embedding_cosine" in quality:
        return f"{quality['embedding_cosine']:.4f} / {quality['embedding_cosine_min']:.4f}"
    return ""


def _ratio(row: dict, shape: str) -> str:
    latency = (row.get("latency") or {}).get(shape)
    return "" if latency is None else f"{latency['ratio']:.2f}"


def _settings(row: dict) -> str:
    """The row's settings, with what was measured where it matters: the zeros a pruning method
    left, and whether a smoothing modifier found any layer to rescale."""
    text = row["settings"]
    zeros = row.get("weight_zero_fraction")
    if zeros is not None and any(method in row["row"] for method in PRUNING):
        text += f" ({zeros:.1%} zeros)"
    smoothing = "smoothquant" in row["row"] or "awq" in row["row"]
    if smoothing and (row.get("summary") or {}).get("norm_layers_rescaled") == 0:
        text += " (smoothing rescaled no layer: no mapping for this architecture)"
    return text


def model_table(model: BenchModel, rows: list[dict], shapes: list[str]) -> list[str]:
    quality = "perplexity" if model.metric == "perplexity" else "cosine to FP32 (mean / min)"
    lines = [
        f"| row | settings | {quality} | compress s | peak RSS MB | size MB | saved as "
        + "".join(f"| latency ×FP32 {shape} " for shape in shapes)
        + "|",
        "|---|---|---|---|---|---|---" + "|---" * len(shapes) + "|",
    ]
    not_run = []
    for row in rows:
        if row["status"] != "ok":
            reason = row.get("reason") or row.get("error") or ""
            not_run.append(
                f"- `{row['row']}` {row['status']}: {reason.splitlines()[0][:300] if reason else ''}"
            )
            continue
        lines.append(
            f"| `{row['row']}` | {_settings(row)} | {_quality(row, model.metric)} "
            f"| {row['compress_s']:.1f} | {_mb(row['peak_rss_bytes'])} | {_mb(row['size_bytes'])} "
            f"| {row['size_format']} "
            + "".join(f"| {_ratio(row, shape)} " for shape in shapes)
            + "|"
        )
    if not_run:
        lines += ["", "Not measured:", "", *not_run]
    return lines


def against_targets(model: BenchModel, by_name: dict[str, dict]) -> list[str]:
    lines = []
    lower_is_better = model.metric == "perplexity"
    for ours_name, peer_name in PAIRS:
        ours, peer = by_name.get(ours_name), by_name.get(peer_name)
        if ours is None or peer is None:
            continue
        if ours["status"] != "ok" or peer["status"] != "ok":
            states = f"{ours['status']} / {peer['status']}"
            lines.append(f"- `{ours_name}` vs `{peer_name}`: not compared ({states}).")
            continue
        key = "perplexity" if lower_is_better else "embedding_cosine"
        a, b = ours["quality"][key], peer["quality"][key]
        quality_met = a <= b if lower_is_better else a >= b
        time_ratio = ours["compress_s"] / peer["compress_s"] if peer["compress_s"] else float("inf")
        memory_met = ours["peak_rss_bytes"] <= peer["peak_rss_bytes"]
        fmt = "{:.2f}" if lower_is_better else "{:.4f}"
        lines.append(
            f"- `{ours_name}` vs `{peer_name}`: {key} {fmt.format(a)} vs {fmt.format(b)} "
            f"({'met' if quality_met else 'missed'}); compression {ours['compress_s']:.1f} s vs "
            f"{peer['compress_s']:.1f} s = {time_ratio:.2f}× ({'met' if time_ratio <= 0.5 else 'missed'}"
            f", target ≤ 0.5×); peak RSS {_mb(ours['peak_rss_bytes'])} vs "
            f"{_mb(peer['peak_rss_bytes'])} MB ({'met' if memory_met else 'missed'})."
        )
    return lines


def consistency(model: BenchModel, rows: list[dict]) -> list[str]:
    """Whether every row saw the same inputs, and the harness agrees across the two venvs."""
    done = [row for row in rows if row["status"] == "ok"]
    if not done:
        return []
    calibration = {row["calibration_sha256"] for row in done}
    windows = {row["evaluation_windows_sha256"] for row in done}
    lines = [
        f"Inputs: {len(done)} measured rows saw "
        + ("the same calibration ids" if len(calibration) == 1 else "DIFFERENT calibration ids")
        + (
            ""
            if model.metric != "perplexity"
            else " and "
            + ("the same" if len(windows) == 1 else "DIFFERENT")
            + " perplexity windows"
        )
        + " (sha256 recorded per row)."
    ]
    by_name = {row["row"]: row for row in done}
    if "fp32" in by_name and "fp32@peers-venv" in by_name:
        ours, peers = by_name["fp32"]["quality"], by_name["fp32@peers-venv"]["quality"]
        key = "perplexity" if model.metric == "perplexity" else "embedding_cosine"
        lines[0] += (
            f" FP32 {key}: {ours[key]:.4f} in the project's venv, {peers[key]:.4f} in the peers' "
            "venv."
        )
    return lines


NOTES = """\
How to read this:
- Every row ran in its own process; "peak RSS" is that process's VmHWM right after compressing, so it
  includes Python, the libraries it imports and the float32 model (SmolLM2 about 540 MB, MiniLM 90 MB).
- Quality and latency are of the model as saved and loaded back: Slimformer's folder through
  `load_artifact` (the CPU int4/int8 kernels where they apply), llm-compressor's through transformers'
  `from_pretrained`, where compressed-tensors has no CPU integer kernels: it decompresses the weights
  to float on the first forward and fake-quantizes activations where the scheme has them (its formats
  are meant for vLLM on GPUs). torchao and torch.ao are measured in memory, as they quantize in place.
- The peers run in bench/.peers-venv with transformers 5.17 / compressed-tensors 0.19 (llm-compressor
  0.14's pins); the `fp32@peers-venv` row measures float32 there with the same harness.
- This machine is shared: wall times are noisy, latency ratios less so (the two models alternate).
"""


def write_results(body: dict, name: str = "quant_peers") -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(body, indent=2, default=str) + "\n")
    settings, machine = body["settings"], body["machine"]
    shapes = [f"{b}x{s}" for b, s in settings["latency"]["shapes"]]
    lines = [
        "# Slimformer against peer libraries",
        "",
        f"Reproduce: `{body['command']}` (this run: {body.get('wall_s', 0) / 60:.0f} min, finished "
        f"{body.get('finished_at', '')}; rows of earlier runs with the same settings are kept, each "
        "with its `measured_at`).",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
        f"({', '.join(machine['isa'])}), shared with other work; load average "
        f"{body.get('load_average_start')} at the start. Calibration: {settings['samples']} × "
        f"{settings['seq_len']} tokens of {CALIBRATION_DATASET} (seed {SEED}), the same token ids "
        f"for every library. Perplexity: {settings['windows']} windows of {settings['seq_len']} tokens "
        f"of enwiki-evaluation; cosine: {settings['embedding_texts']} lee-sentences texts. Latency: a "
        f"full forward at {' and '.join(shapes)}, median of {settings['latency']['runs']} runs "
        "alternating with float32 in the same process.",
        "",
        "Versions: "
        + "; ".join(
            f"{venv} venv: " + ", ".join(f"{k} {v}" for k, v in (versions or {}).items() if v)
            for venv, versions in body["versions"].items()
        ),
        "",
    ]
    for key in settings["models"]:
        model = MODELS[key]
        rows = [r for r in body["rows"] if r["model"] == key]
        lines += [f"## {model.builtin}", ""]
        missing = sorted({row.name for row in ROWS} - {r["row"] for r in rows})
        if missing:
            lines += [
                f"Not measured at these settings yet (add them with `--models {key} "
                f"--only ...`): {', '.join(f'`{name}`' for name in missing)}.",
                "",
            ]
        if not rows:
            continue
        lines += [*model_table(model, rows, shapes), ""]
        lines += [*consistency(model, rows), ""]
        comparison = against_targets(model, {r["row"]: r for r in rows})
        if comparison:
            lines += [
                "Against the targets (quality at least the peer's, at most half its compression "
                "time, no more peak memory):",
                "",
                *comparison,
                "",
            ]
    lines += [NOTES]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--only", nargs="+", metavar="ROW", help="row names or fnmatch patterns")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument(
        "--seq-len", type=int, default=512, help="calibration and perplexity window length"
    )
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows")
    parser.add_argument(
        "--embedding-texts", type=int, default=256, help="lee-sentences texts (MiniLM)"
    )
    parser.add_argument(
        "--latency-shapes",
        nargs="+",
        default=["1x128", "32x128"],
        metavar="BxT",
        help="batch x tokens of the timed forwards",
    )
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument("--latency-warmup", type=int, default=1)
    parser.add_argument(
        "--row-timeout", type=int, default=7200, help="seconds before a row is killed"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "slimformer-bench",
        help="where SmolLM2 is converted and the rows' inputs and logs are written",
    )
    parser.add_argument("--fresh", action="store_true", help="discard rows of an earlier run")
    parser.add_argument("--setup", action="store_true", help="(re)install the peers' venv and exit")
    parser.add_argument(
        "--report", action="store_true", help="rewrite quant_peers.md from the JSON and exit"
    )
    parser.add_argument(
        "--results-name",
        default="quant_peers",
        help="bench/results/<name>.{json,md}: another name keeps a run at other settings (whose "
        "rows would otherwise replace quant_peers.json's) beside it",
    )
    args = parser.parse_args(argv)
    args.latency_shapes = [[int(n) for n in shape.split("x")] for shape in args.latency_shapes]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.setup:
        setup_peers_venv()
        return
    if args.report:
        name = args.results_name
        write_results(json.loads((RESULTS / f"{name}.json").read_text()), name)
        return
    rows = [
        row
        for row in ROWS
        if not args.only or any(fnmatch.fnmatchcase(row.name, pattern) for pattern in args.only)
    ]
    if not rows:
        raise SystemExit(f"no row matches {args.only}; rows: {', '.join(r.name for r in ROWS)}")
    if any(row.venv == "peers" for row in rows) and not peers_ready():
        setup_peers_venv()

    settings = {
        "models": args.models,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "seed": SEED,
        "calibration_dataset": CALIBRATION_DATASET,
        "windows": args.windows,
        "embedding_texts": args.embedding_texts,
        "latency": {
            "shapes": args.latency_shapes,
            "runs": args.latency_runs,
            "warmup": args.latency_warmup,
        },
    }
    previous_rows, previous_inputs = [], {}
    results_file = RESULTS / f"{args.results_name}.json"
    if results_file.exists() and not args.fresh:
        previous = json.loads(results_file.read_text())
        comparable = {k: v for k, v in previous.get("settings", {}).items() if k != "models"}
        if comparable == {k: v for k, v in settings.items() if k != "models"}:
            previous_rows = previous.get("rows", [])
            previous_inputs = previous.get("inputs", {})
            settings["models"] = [
                m for m in MODELS if m in set(args.models) | set(previous["settings"]["models"])
            ]
    command = "python -m bench.quant_peers " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    body = {
        "command": command.strip(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "settings": settings,
        "machine": machine_info(),
        "versions": {venv: venv_versions(venv) for venv in ("main", "peers")},
        "inputs": previous_inputs,
        "rows": previous_rows,
    }
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="quant-peers-", dir=args.cache_dir))
    print(f"inputs and row logs: {work}", flush=True)
    order = {(m, r.name): i for i, (m, r) in enumerate((m, r) for m in MODELS for r in ROWS)}
    for key in args.models:
        model = MODELS[key]
        inputs = prepare_inputs(model, args, work / "inputs")
        body["inputs"][key] = inputs
        for row in sorted(rows, key=run_priority):
            result = run_row(row, model, inputs, args, work)
            body["rows"] = [r for r in body["rows"] if (r["model"], r["row"]) != (key, row.name)]
            body["rows"].append(result)
            body["rows"].sort(key=lambda r: order.get((r["model"], r["row"]), len(order)))
            body["wall_s"] = time.perf_counter() - started
            body["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            write_results(body, args.results_name)
            summary = (
                f"ppl/cos {_quality(result, model.metric)}, {result['compress_s']:.1f} s, "
                f"peak {_mb(result['peak_rss_bytes'])} MB"
                if result["status"] == "ok"
                else (result.get("reason") or result.get("error") or "")[:200]
            )
            print(
                f"[{key}] {row.name}: {result['status']} ({result['process_wall_s']:.0f} s) {summary}",
                flush=True,
            )
    body["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(body, args.results_name)
    print((RESULTS / f"{args.results_name}.md").read_text())


if __name__ == "__main__":
    main()
