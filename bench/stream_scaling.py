"""Peak memory and wall time of streamed compression against model size (issue 11).

For each (model, method) row, in a fresh process: load the model streamed (blocks on disk, one
resident; `workers/compression/streaming.py`), compress, write the export (shards, block by block)
and check it (every shard read back; the largest prefix of blocks that fits loaded and run). Each
phase reports its wall time, its CPU time (user + system of the whole process, all threads:
`getrusage(RUSAGE_SELF)` deltas; on a machine shared with other work the CPU time is what still
says how the work grows, wall time is inflated by the others) and its own peak RSS (the kernel's
high-water mark, reset before the phase: `/proc/self/clear_refs`), so the numbers say where the
memory goes. Models: SmolLM2-135M
(the built-in, float32) and random Llama-shaped bf16 models written by `bench.synthetic`
(`llama-1b`: Llama-3.2-1B's shapes, 2.47 GB; `llama-7b`: Llama-2-7B's, 13.5 GB). Quality is not
measured here (random weights); the built-in quality tests and `bench.quant_peers` measure it.

    .venv/bin/python -m bench.stream_scaling                                  # every row
    .venv/bin/python -m bench.stream_scaling --models smollm2 --methods gptq --samples 64 --seq-len 512
    .venv/bin/python -m bench.stream_scaling --whole ...     # the same rows, model held whole (for the ratio)
    .venv/bin/python -m bench.stream_scaling --models smollm2 --methods gptq llmcompressor-gptq \
        --samples 64 --seq-len 512 --threads 1    # and llm-compressor's GPTQ, in bench/.peers-venv

    .venv/bin/python -m bench.stream_scaling --row MODEL METHOD --out row.json ...   # one row, no merge
    .venv/bin/python -m bench.stream_scaling --merge row.json ...   # merge rows run with --row

Writes bench/results/stream_scaling.{json,md}; rows of an earlier run are kept unless rerun (a row
is replaced by one of the same model, method, mode, device and calibration). Each row is merged
under a file lock as it finishes, so two runs side by side do not drop each other's rows.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
METHODS = {
    "rtn": [{"method": "rtn", "bits": 4, "group_size": 64}],
    "gptq": [{"method": "gptq", "bits": 4, "group_size": 64}],
    "smoothquant+w8a8": [
        {"method": "smoothquant", "alpha": 0.5},
        {"method": "w8a8", "activations": "dynamic"},
    ],
    "sparsegpt": [{"method": "sparsegpt", "sparsity": 0.5}],
    "fp8": [{"method": "fp8", "activations": "dynamic"}],
}
# A peer library's row, for the peak-memory ratio in the same run: llm-compressor's GPTQ at the
# scheme of `gptq` above (symmetric int4, groups of 64), run in bench/.peers-venv
# (`bench.quant_peers` builds it) on the same calibration token ids.
PEERS = {
    "llmcompressor-gptq": {
        "library": "llm-compressor",
        "package": "llmcompressor",  # its distribution's name, for the version
        "options": {"kind": "gptq-w4a16"},
        "ours": "gptq",  # the row of ours it is compared with
    }
}
MODELS = ("smollm2", "llama-1b-4layers", "llama-1b", "llama-7b-4layers", "llama-7b")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> None:
    from workers.compression import process_memory

    process_memory.trim()
    process_memory.reset_peak()


class _RssSampler:
    """The largest RssAnon (heap, tensors) and RssFile (mapped files: shared libraries, mmap'd
    safetensors pages, which the kernel can reclaim) seen since `restart`, polled from
    /proc/self/status every 20 ms on a thread: VmHWM only has their sum."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self) -> None:
        import threading

        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        from workers.compression import process_memory

        for field in self.FIELDS:
            value = process_memory.status_bytes(field) or 0
            self.peaks[field] = max(self.peaks[field], value)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def restart(self) -> None:
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self._sample()

    def read(self) -> dict[str, int]:
        self._sample()
        return dict(self.peaks)


class _Phases:
    """A row's measurements: each phase's wall time, CPU time and its own peak RSS (the
    high-water mark is reset before it starts), on a GPU its peak device memory, and what the row
    ran under (commit, threads, device, load average)."""

    def __init__(self, args: argparse.Namespace) -> None:
        # The code this row runs, read at its start: a commit made meanwhile is not it.
        self.commit = _commit()
        self.load_at_start = os.getloadavg()
        self.threads, self.device = args.threads, args.device
        self.cuda = args.device.startswith("cuda")
        self.sampler = _RssSampler()
        self.measured: dict[str, dict] = {}

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        from workers.compression import process_memory

        _reset_peak()
        self.sampler.restart()
        at_start = process_memory.status_bytes("VmRSS")  # what earlier phases left resident
        started = time.perf_counter(), _cpu_seconds()
        value = work()
        peaks = self.sampler.read()
        self.measured[name] = {
            "seconds": round(time.perf_counter() - started[0], 2),
            "cpu_seconds": round(_cpu_seconds() - started[1], 2),
            "peak_rss_bytes": process_memory.status_bytes("VmHWM"),
            "peak_rss_anon_bytes": peaks["RssAnon"],
            "peak_rss_file_bytes": peaks["RssFile"],
            "rss_at_start_bytes": at_start,
        }
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.measured[name]["peak_device_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return value

    def totals(self) -> dict:
        phases = self.measured
        return {
            "threads": self.threads,
            "device": self.device,
            "phases": phases,
            "peak_rss_bytes": max(p["peak_rss_bytes"] for p in phases.values()),
            "peak_rss_anon_bytes": max(p["peak_rss_anon_bytes"] for p in phases.values()),
            "wall_s": round(sum(p["seconds"] for p in phases.values()), 2),
            "cpu_s": round(sum(p["cpu_seconds"] for p in phases.values()), 2),
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_average_start": self.load_at_start,
            "load_average": os.getloadavg(),
            "commit": self.commit,
        }


def model_folder(name: str, work: Path) -> Path:
    from workers.compression.examples import builtin_model_folder

    cache = work / "cache"
    if name == "smollm2":
        return builtin_model_folder("SmolLM2-135M-Instruct", cache)
    from bench.synthetic import SHAPES, write_model

    folder = work / name
    if not (folder / "config.json").is_file():
        tokenizer = builtin_model_folder("SmolLM2-135M-Instruct", cache)
        write_model(folder, SHAPES[name], tokenizer_from=tokenizer)
    return folder


def _calibration_ids(tokenizer: Any, args: argparse.Namespace) -> list:
    """The row's calibration windows of enwiki-calibration, as every row (a peer's too) makes them."""
    from workers.compression.data import calibration_batches
    from workers.compression.examples import builtin_dataset_jsonl

    texts = [
        json.loads(line)["text"]
        for line in builtin_dataset_jsonl("enwiki-calibration").splitlines()
    ]
    return calibration_batches(
        texts, tokenizer, num_samples=args.samples, seq_len=args.seq_len, seed=0
    )


def _calibration_record(args: argparse.Namespace, calibration: list | None) -> dict | None:
    """The row's calibration, its token ids hashed as bench.quant_peers hashes its own: equal
    hashes, the same calibration in both benches (and in a peer's row)."""
    import torch

    if not calibration:
        return None
    ids = torch.cat(calibration).numpy().tobytes()
    return {
        "samples": args.samples,
        "seq_len": args.seq_len,
        "sha256": hashlib.sha256(ids).hexdigest(),
    }


def peer_inputs(model: str, args: argparse.Namespace) -> list[str]:
    """A peer row's model folder and calibration token ids, made here (the main venv) exactly as
    our rows make them: the peer sees the same windows."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder = model_folder(model, args.work)
    calibration = _calibration_ids(AutoTokenizer.from_pretrained(folder), args)
    path = args.work / f"calibration-{model}-{args.samples}x{args.seq_len}.safetensors"
    save_file({"input_ids": torch.cat(calibration)}, path)
    return ["--folder", str(folder), "--calibration", str(path)]


def run_peer_row(args: argparse.Namespace) -> dict:
    """A peer library's row, in bench/.peers-venv: the model loaded whole as the library's users
    load it (transformers' `from_pretrained`, in the checkpoint's dtype), compressed by the library
    on the same calibration token ids as our rows, saved compressed (`save_pretrained`), and
    loaded back with transformers and run once on a sample (the check). The phases are ours."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.peers.compressors import build, targets_of

    phases = _Phases(args)
    torch.set_num_threads(args.threads)
    # Both prepared by the main venv: the built-ins' packages are not in the peers' venv.
    folder = args.folder
    peer = PEERS[args.method]
    compressor = build(peer["library"], peer["options"])
    compressor.check()

    def load() -> tuple:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = load_file(args.calibration)["input_ids"]
        return model, tokenizer, [row.unsqueeze(0) for row in ids]

    model, tokenizer, calibration = phases.run("load", load)
    parameters = sum(p.numel() for p in model.parameters())
    dtype = str(model.dtype).removeprefix("torch.")
    loaded = SimpleNamespace(model=model, tokenizer=tokenizer, task="causal-lm", folder=folder)
    summary = phases.run(
        "compress", lambda: compressor.compress(loaded, calibration, targets_of(model))
    )
    out = args.work / f"out-{args.model}-{args.method}"
    shutil.rmtree(out, ignore_errors=True)
    phases.run("export", lambda: model.save_pretrained(out, save_compressed=True))
    # The check's peak is the reloaded model's, not both: llm-compressor's session holds the
    # model it compressed until it is reset.
    loaded = model = None
    if peer["library"] == "llm-compressor":
        from llmcompressor.core import reset_session

        reset_session()
    gc.collect()
    size = sum(path.stat().st_size for path in out.glob("*.safetensors"))

    def check() -> list[int]:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
        with torch.no_grad():
            logits = reloaded(calibration[0][:, :64]).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("the reloaded model's logits are not finite")
        return list(logits.shape)

    logits_shape = phases.run("check", check)
    shutil.rmtree(out, ignore_errors=True)
    on_disk = sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
    return {
        "model": args.model,
        "method": args.method,
        "library": peer["library"],
        "library_version": importlib.metadata.version(peer["package"]),
        "streamed": False,
        "stages": [peer["options"]],
        "modifiers": summary.get("modifiers"),
        "parameters": parameters,
        "checkpoint_bytes": on_disk,
        "checkpoint_dtype": dtype,
        "calibration": _calibration_record(args, calibration),
        **phases.totals(),
        "artifact_bytes": size,
        "export_check": {"reloaded_logits_shape": logits_shape},
    }


def run_row(args: argparse.Namespace) -> dict:
    """One row, in this process."""
    import torch

    from workers.compression import compress, process_memory
    from workers.compression.export import verify, write_draft
    from workers.compression.loading import load_model
    from workers.compression.recipe import Recipe

    phases = _Phases(args)
    torch.set_num_threads(args.threads)
    process_memory.return_large_frees()  # as a worker's job process does (workers/celery_app.py)
    folder = model_folder(args.model, args.work)
    stages = METHODS[args.method]
    recipe = Recipe.model_validate({"stages": stages})

    def load() -> tuple:
        # A scratch folder of the row's own: rows run side by side must not share block files.
        scratch = args.work / f"blocks-{args.model}-{args.method}"
        loaded = load_model(folder, device=args.device, streamed=not args.whole, scratch=scratch)
        calibration = _calibration_ids(loaded.tokenizer, args) if recipe.needs_calibration else None
        return loaded, calibration

    loaded, calibration = phases.run("load", load)
    parameters = sum(p.numel() for p in loaded.model.parameters())  # before any layer is replaced
    result = phases.run("compress", lambda: compress(loaded.model, recipe, calibration))
    out = args.work / f"out-{args.model}-{args.method}"
    draft = phases.run(
        "export",
        lambda: write_draft(
            loaded, result.model, out, recipe={"stages": stages}, inputs={}, sparse_storage="dense"
        ),
    )
    size = sum(path.stat().st_size for path in draft.path.glob("*.safetensors"))
    sample = calibration[0][:, :64] if calibration else torch.tensor([[1, 450, 4996, 17354]])
    sample = sample.to(args.device)
    check = phases.run("check", lambda: verify(draft, result.model, loaded.task, sample))
    draft.discard()
    on_disk = sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
    return {
        "model": args.model,
        "method": args.method,
        "streamed": not args.whole,
        "stages": stages,
        "parameters": parameters,
        "checkpoint_bytes": on_disk,
        "checkpoint_dtype": str(loaded.dtype).removeprefix("torch."),
        "calibration": _calibration_record(args, calibration),
        **phases.totals(),
        "artifact_bytes": size,
        "export_check": {k: v for k, v in check.report.items() if k != "runtime"},
        "memory_budget_bytes": os.environ.get("SLIMFORMER_MEMORY_LIMIT_BYTES"),
    }


def _commit() -> str:
    """The code measured: HEAD, marked `+dirty` when the work tree differs from it."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=BENCH.parent, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + (
        "+dirty"
        if git("status", "--porcelain", "--", "workers", "bench", ":(exclude)bench/results")
        else ""
    )


def _mb(value: int) -> str:
    return f"{value / 1e6:,.0f}"


def _anon(row: dict) -> str:
    phases = row["phases"]
    order = PHASES
    if "peak_rss_anon_bytes" not in row:
        return "-"
    parts = " / ".join(_mb(phases[k]["peak_rss_anon_bytes"]) for k in order)
    return f"**{_mb(row['peak_rss_anon_bytes'])}** ({parts})"


PHASES = ("load", "compress", "export", "check")


def _cpu(row: dict) -> str:
    """CPU seconds, total (per phase); - for rows measured before CPU time was recorded."""
    if "cpu_s" not in row:
        return "-"
    parts = " / ".join(str(round(row["phases"][k]["cpu_seconds"])) for k in PHASES)
    return f"{row['cpu_s']:.0f} ({parts})"


def _calibration(row: dict) -> str:
    calibration = row.get("calibration")
    return f"{calibration['samples']} x {calibration['seq_len']}" if calibration else "-"


def row_key(row: dict) -> tuple:
    """Rows with the same key replace each other; other calibrations sit beside each other."""
    return (
        row["model"],
        row["method"],
        row["streamed"],
        row.get("device", "cpu"),
        _calibration(row),
    )


def block_parameters(row: dict) -> int | None:
    """The row's parameters less its embeddings, head and final norm: what a method compresses,
    block by block. From the model's shape (`bench.synthetic.SHAPES`; SmolLM2-135M: vocabulary
    49,152 x hidden 576, tied); None for a model of unknown shape."""
    from bench.synthetic import SHAPES

    if row["model"] == "smollm2":
        vocab, hidden, tied = 49152, 576, True
    elif row["model"] in SHAPES:
        shape = SHAPES[row["model"]]
        vocab, hidden, tied = shape.vocab, shape.hidden, shape.tie_embeddings
    else:
        return None
    return row["parameters"] - vocab * hidden * (1 if tied else 2) - hidden


def cpu_per_parameter_table(rows: list[dict]) -> list[str]:
    """Compress-phase CPU seconds per billion parameters, per method and calibration, by size."""
    measured = [r for r in rows if "cpu_s" in r]
    if not measured:
        return []
    lines = [
        "",
        "## Compress-phase CPU seconds per billion parameters",
        "",
        "CPU time (user + system, every thread) of the compress phase divided by the model's "
        "parameters, smallest model first: all of them, and those of its blocks only (what the "
        "methods compress; the embeddings, 263M of llama-1b-4layers' 506M, are not). Constant "
        "down a method's rows: the work grows linearly in parameters. Only rows with CPU time "
        "recorded; calibrated methods compare at the same calibration only.",
        "",
        "| method | calibration | model | params | block params | compress CPU s | "
        "compress wall s | CPU s per B params | CPU s per B block params | "
        "load avg (start / end) | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(
        measured,
        key=lambda r: ([*METHODS, *PEERS].index(r["method"]), _calibration(r), r["parameters"]),
    )
    for row in ordered:
        compress = row["phases"]["compress"]
        start = row.get("load_average_start")
        end = row.get("load_average")
        loads = f"{start[0]:.1f} / {end[0]:.1f}" if start and end else "-"
        blocks = block_parameters(row)
        per_block = f"{compress['cpu_seconds'] / (blocks / 1e9):.0f}" if blocks else "-"
        lines.append(
            f"| {row['method']} | {_calibration(row)} | {row['model']} "
            f"{'' if row['streamed'] else '(whole) '}| {row['parameters'] / 1e9:.2f}B | "
            f"{f'{blocks / 1e9:.3f}B' if blocks else '-'} | "
            f"{compress['cpu_seconds']:.0f} | {compress['seconds']:.0f} | "
            f"{compress['cpu_seconds'] / (row['parameters'] / 1e9):.0f} | {per_block} | {loads} | "
            f"{row.get('commit', '-')} |"
        )
    return lines


def _through_compress(row: dict) -> int:
    """The peak RSS of loading and compressing: what the peer's own work holds (its export and
    our check differ in what they do)."""
    return max(row["phases"][k]["peak_rss_bytes"] for k in ("load", "compress"))


def peer_table(rows: list[dict]) -> list[str]:
    """Each peer row against our streamed row of the same model, method and calibration ids."""
    pairs = []
    for peer in (r for r in rows if r["method"] in PEERS):
        ours = [
            r
            for r in rows
            if r["method"] == PEERS[peer["method"]]["ours"]
            and r["model"] == peer["model"]
            and r["streamed"]
            and (r.get("calibration") or {}).get("sha256") == peer["calibration"]["sha256"]
        ]
        if ours:
            pairs.append((ours[0], peer))
    if not pairs:
        return []
    lines = [
        "",
        "## Against a peer library, on the same calibration token ids",
        "",
        "Our streamed row against the peer's, which loads the model whole as its users do "
        "(`from_pretrained` in the checkpoint's dtype) and runs in bench/.peers-venv. Load + "
        "compress is the peak through compressing; overall adds export and check, where the two "
        "differ in what they do (ours checks the artifact against the engine's model block by "
        "block; the peer's reloads it with transformers and runs it once).",
        "",
        "| model | calibration | method | peak RSS MB, load + compress (ours / peer, ratio) | "
        "peak RSS MB, overall (ours / peer, ratio) | compress CPU s (ours / peer) | "
        "compress wall s (ours / peer) | measured (ours / peer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ours, peer in pairs:
        early = _through_compress(ours), _through_compress(peer)
        overall = ours["peak_rss_bytes"], peer["peak_rss_bytes"]
        cpu = [r["phases"]["compress"]["cpu_seconds"] for r in (ours, peer)]
        wall = [r["phases"]["compress"]["seconds"] for r in (ours, peer)]
        lines.append(
            f"| {ours['model']} | {_calibration(ours)} | {ours['method']} vs {peer['method']} "
            f"({peer['library']} {peer['library_version']}) | {_mb(early[0])} / {_mb(early[1])} "
            f"(**{early[0] / early[1]:.2f}×**) | {_mb(overall[0])} / {_mb(overall[1])} "
            f"({overall[0] / overall[1]:.2f}×) | {cpu[0]:.0f} / {cpu[1]:.0f} | "
            f"{wall[0]:.0f} / {wall[1]:.0f} | {ours['measured_at'][:16]} {ours.get('commit', '-')}"
            f" / {peer['measured_at'][:16]} |"
        )
    return lines


def merge_rows(new: list[dict], command: str) -> list[dict]:
    """Merge `new` into bench/results/stream_scaling.json (each replacing the row of its key) and
    rewrite the Markdown, under a lock: runs side by side each merge their own rows."""
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / ".stream_scaling.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = RESULTS / "stream_scaling.json"
        rows = json.loads(previous.read_text())["rows"] if previous.is_file() else []
        for row in new:
            rows = [r for r in rows if row_key(r) != row_key(row)]
            rows.append(row)
        write_results(rows, command)
    return rows


def write_results(rows: list[dict], command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    body = {
        "command": command,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "rows": rows,
    }
    (RESULTS / "stream_scaling.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Streamed compression: peak RSS and wall time against model size",
        "",
        f"`{body['command']}` on {body['machine']['cores']} cores (shared; load average "
        f"{body['machine']['load_average'][0]:.1f} at the end). Peak RSS is the process's own high "
        "water mark per phase (load / compress / export / check), in MB; the row's peak is the "
        "largest. The export check loads as many blocks as fit the row's memory budget "
        "(`memory_budget_bytes` in the JSON; none: all that fit the machine). Random weights for "
        "the Llama shapes: no quality here.",
        "",
        "",
        "RssAnon is the anonymous part of RSS (heap: tensors, activations), sampled every 20 ms; "
        "the rest is file-backed (shared libraries, safetensors pages read through mmap), which "
        "the kernel reclaims under pressure. Rows measured before the sampler existed show -.",
        "",
        "Rows measured with the code of this branch carry its commit; rows without one were "
        "measured before (the committed code of their `measured_at`, kept for comparison). The "
        "load average is the 1-minute one when the row ended (2 shared cores: wall times above "
        "2 are inflated by other work).",
        "",
        "CPU s is user + system time of the row's process (every thread), per phase: unlike "
        "wall time it is barely inflated by other work on the machine (rows measured before it "
        "was recorded show -). Each row's exact command is its `command` in the JSON.",
        "",
        "| model | params | checkpoint MB | method | calibration | mode | peak RSS MB (load / compress / export / check) | peak RssAnon MB (load / compress / export / check) | CPU s (load / compress / export / check) | wall s (load / compress / export / check) | artifact MB | load avg | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["phases"]
        order = PHASES
        samples = _calibration(row)
        load = row.get("load_average")
        lines.append(
            f"| {row['model']} | {row['parameters'] / 1e9:.2f}B | {_mb(row['checkpoint_bytes'])} "
            f"({row['checkpoint_dtype']}) | {row['method']} | {samples} | "
            f"{'streamed' if row['streamed'] else 'whole'} | **{_mb(row['peak_rss_bytes'])}** "
            f"({' / '.join(_mb(p[k]['peak_rss_bytes']) for k in order)}) | {_anon(row)} | "
            f"{_cpu(row)} | {row['wall_s']:.0f} "
            f"({' / '.join(str(round(p[k]['seconds'])) for k in order)}) | "
            f"{_mb(row['artifact_bytes'])} | {f'{load[0]:.1f}' if load else '-'} | "
            f"{row.get('commit', '-')} |"
        )
    lines += cpu_per_parameter_table(rows)
    lines += peer_table(rows)
    notes = RESULTS / "stream_scaling.notes.md"  # kept by hand: what the rows show
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").rstrip()]
    (RESULTS / "stream_scaling.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[m for m in METHODS if m != "fp8"],
        choices=[*METHODS, *PEERS],
        help=f"ours, or a peer's (in bench/.peers-venv, whole): {', '.join(PEERS)}",
    )
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU, blocks onloaded)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole", action="store_true", help="hold the model whole (not streamed)")
    parser.add_argument(
        "--budget-gb", type=float, default=3.0, help="the memory the export check may assume free"
    )
    parser.add_argument("--work", type=Path, default=Path(".slimformer/bench-scaling"))
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--calibration", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="ROW_JSON", help="merge rows run with --row"
    )
    args = parser.parse_args(argv)
    if args.merge:
        rows = [json.loads(path.read_text()) for path in args.merge]
        merge_rows(
            rows,
            "python -m bench.stream_scaling (rows merged one by one: see each row's `command`)",
        )
        for row in rows:
            print(f"merged {row['model']} {row['method']} {_calibration(row)}", flush=True)
        return
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.row:
        args.model, args.method = args.row
        row = run_peer_row(args) if args.method in PEERS else run_row(args)
        budget = os.environ.get("SLIMFORMER_MEMORY_LIMIT_BYTES")
        row["command"] = (
            (f"SLIMFORMER_MEMORY_LIMIT_BYTES={budget} " if budget else "")
            + "python -m bench.stream_scaling "
            + shlex.join(str(a) for a in argv)
        )
        args.out.write_text(json.dumps(row))
        return

    for model in args.models:
        for method in args.methods:
            out = args.work / f"row-{model}-{method}.json"
            python, peer = sys.executable, []
            if method in PEERS:
                from bench.quant_peers import peers_ready, setup_peers_venv, venv_python

                if not peers_ready():
                    setup_peers_venv()
                python = str(venv_python("peers"))
                peer = peer_inputs(model, args)
            command = [
                python, "-m", "bench.stream_scaling", "--row", model, method,
                "--out", str(out), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                "--threads", str(args.threads), "--work", str(args.work), "--budget-gb", str(args.budget_gb),
                "--device", args.device,
            ] + (["--whole"] if args.whole else []) + peer  # fmt: skip
            print(f"{model} {method} ...", flush=True)
            # The export check loads the largest prefix of blocks that fits what preflight sees
            # as free; a budget keeps that (and so the row's peak) to what a worker would have.
            budget = {"SLIMFORMER_MEMORY_LIMIT_BYTES": str(int(args.budget_gb * 1e9))}
            done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **budget})
            if done.returncode != 0:
                print(f"{model} {method}: exit {done.returncode}", flush=True)
                continue
            row = json.loads(out.read_text())
            merge_rows(
                [row],
                "python -m bench.stream_scaling (rows merged one by one: see each row's `command`)",
            )
            print(
                f"  peak RSS {row['peak_rss_bytes'] / 1e6:,.0f} MB, {row['cpu_s']:.0f} CPU s, "
                f"{row['wall_s']:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
