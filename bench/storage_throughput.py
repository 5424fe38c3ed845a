"""S3 storage throughput: upload and download MB/s and peak memory for one large object (512 MB by
default) through `S3Store`, against moto's S3 server on this machine. Writes
bench/results/storage_throughput.{json,md}.

    .venv/bin/python -m bench.storage_throughput              # 512 MB, plus a part-size sweep
    .venv/bin/python -m bench.storage_throughput --size-mb 128 --no-sweep

Each measurement runs in a fresh process, so its peak RSS (`ru_maxrss`) is that operation's alone:
- `upload`: `write_stream` in 1 MiB chunks (what the upload route and `put_file` do): multipart,
  sha256 on the way;
- `download`: `open` + 1 MiB reads (what `GET /v1/artifacts/{id}/content` streams);
- `fetch`: `fetch` to a local file (what workers do with uploads and datasets);
- `raw_put`: one plain HTTP PUT of the same bytes with httpx, no SDK, no hashing: the server's own
  ceiling for taking bytes in.
The same on `LocalStore` (the local disk) gives the ceiling of this machine for comparison, and an
upload of a quarter of the size shows whether the upload's memory depends on the object's size.

moto's server is Python in a process of its own (Werkzeug, one GIL), so the CPU seconds of both
sides are recorded: the side whose CPU time is close to the wall time is the one that limits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MB = 1024 * 1024
CHUNK = MB
TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _block() -> bytes:
    # 16 MiB of random bytes, repeated: generating 512 MB of fresh randomness would be measured
    # instead of the store. Nothing on the path deduplicates or compresses.
    return os.urandom(16 * MB)


def _chunks(size: int, block: bytes):  # noqa: ANN202
    sent = 0
    while sent < size:
        offset = sent % len(block)
        piece = block[offset : offset + min(CHUNK, size - sent)]
        sent += len(piece)
        yield piece


def measure(operation: str, backend: str, size: int, server_pid: int, location: str) -> dict:
    """One operation in this (fresh) process."""
    if backend == "s3":
        import app.storage_s3 as s3

        s3.IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", s3.IN_FLIGHT))
        part = int(os.environ.get("BENCH_PART_MB", s3.PART_SIZE // MB)) * MB
        store = s3.S3Store(location, "bench", part_size=part)
        store.ping()
    else:
        from app.storage import LocalStore

        store = LocalStore(Path(location))
    block = _block() if operation in ("upload", "raw_put") else b""
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    server_cpu = _process_cpu_s(server_pid) if backend == "s3" else 0.0
    client_cpu = _self_cpu_s()
    started = time.perf_counter()
    received = 0
    if operation == "upload":
        stored = store.write_stream("big.bin", _chunks(size, block))
        received = stored.size_bytes
    elif operation == "raw_put":
        import httpx

        url = f"{os.environ['AWS_ENDPOINT_URL']}/{location}/raw.bin"
        response = httpx.put(
            url,
            content=_chunks(size, block),
            headers={"Content-Length": str(size)},
            timeout=600,
        )
        response.raise_for_status()
        received = size
    elif operation == "download":
        with store.open("big.bin") as handle:
            while chunk := handle.read(CHUNK):
                received += len(chunk)
    else:
        target = Path(tempfile.mkdtemp(prefix="slimformer-fetch-")) / "big.bin"
        received = store.fetch("big.bin", target).stat().st_size
        shutil.rmtree(target.parent)
    seconds = time.perf_counter() - started
    assert received == size, (received, size)
    return {
        "operation": operation,
        "backend": backend,
        "size_mb": size / MB,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / MB / seconds, 1),
        "client_cpu_s": round(_self_cpu_s() - client_cpu, 2),
        # what the client side could do if the server took no time: MB per CPU second spent
        "client_mb_per_cpu_s": round(size / MB / max(_self_cpu_s() - client_cpu, 1e-3), 1),
        "server_cpu_s": round(_process_cpu_s(server_pid) - server_cpu, 2)
        if backend == "s3"
        else None,
        "baseline_rss_mb": round(baseline_mb, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _run(operation: str, backend: str, size: int, server_pid: int, location: str, **env) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "bench.storage_throughput", "--measure", operation,
         "--backend", backend, "--bytes", str(size), "--server-pid", str(server_pid),
         "--location", location],
        env={**os.environ, **{k: str(v) for k, v in env.items()}},
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row.update({k.lower(): v for k, v in env.items()})
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--measure")
    parser.add_argument("--backend", default="s3")
    parser.add_argument("--bytes", type=int)
    parser.add_argument("--server-pid", type=int, default=0)
    parser.add_argument("--location")
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    if args.render:
        report = json.loads((RESULTS / "storage_throughput.json").read_text())
        (RESULTS / "storage_throughput.md").write_text(_markdown(report))
        return
    if args.measure:
        row = measure(args.measure, args.backend, args.bytes, args.server_pid, args.location)
        print(json.dumps(row))
        return

    from tests.conftest import s3_server

    size = args.size_mb * MB
    rows: list[dict] = []
    with s3_server() as aws:
        os.environ.update(aws)
        server_pid = _moto_pid(aws["AWS_ENDPOINT_URL"])
        from app.storage_s3 import S3Store

        S3Store("bench").prepare()
        for operation in ("upload", "download", "fetch", "raw_put"):
            rows.append(_run(operation, "s3", size, server_pid, "bench"))
        moto_peak_mb = _peak_rss_mb(server_pid)
        rows.append(_run("upload", "s3", size // 4, server_pid, "bench"))
        if not args.no_sweep:
            for part_mb, in_flight in ((8, 1), (8, 8), (16, 4), (32, 4)):
                rows.append(
                    _run("upload", "s3", size, server_pid, "bench",
                         BENCH_PART_MB=part_mb, BENCH_IN_FLIGHT=in_flight)
                )  # fmt: skip
    local = Path(tempfile.mkdtemp(prefix="slimformer-bench-store-"))
    try:
        for operation in ("upload", "download", "fetch"):
            rows.append(_run(operation, "local", size, 0, str(local)))
    finally:
        shutil.rmtree(local)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "object_mb": args.size_mb,
        "moto_server_peak_rss_mb": round(moto_peak_mb, 1),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "storage_throughput.md").write_text(_markdown(report))
    print(_markdown(report))


def _moto_pid(endpoint: str) -> int:
    port = endpoint.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"moto.server" in cmdline and port.encode() in cmdline:
                return int(proc.name)
    raise RuntimeError("moto server process not found")


def _markdown(report: dict) -> str:
    lines = [
        f"# S3 storage throughput ({report['object_mb']} MB object, "
        f"{report['machine']['cpus']} CPUs)",
        "",
        "| backend | operation | MB | part MB × in flight | MB/s | s | client CPU s "
        "| client MB per CPU s | server CPU s | peak RSS MB (baseline) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        shape = (
            f"{row.get('bench_part_mb', 8)} × {row.get('bench_in_flight', 4)}"
            if row["backend"] == "s3" and row["operation"] == "upload"
            else "–"
        )
        server = "–" if row["server_cpu_s"] is None else row["server_cpu_s"]
        lines.append(
            f"| {row['backend']} | {row['operation']} | {row['size_mb']:.0f} | {shape} | "
            f"{row['mb_per_s']} | {row['seconds']} | {row['client_cpu_s']} | "
            f"{row['client_mb_per_cpu_s']} | {server} | "
            f"{row['peak_rss_mb']} ({row['baseline_rss_mb']}) |"
        )
    lines += ["", *_reading(report), ""]
    return "\n".join(lines)


def _reading(report: dict) -> list[str]:
    """Which side limits, from the rows: the server's own ceiling, and the client's CPU cost."""

    def row(operation: str, backend: str = "s3") -> dict:
        return next(
            r
            for r in report["rows"]
            if (r["operation"], r["backend"]) == (operation, backend) and "bench_part_mb" not in r
        )

    upload, raw, download = row("upload"), row("raw_put"), row("download")
    small = next(r for r in report["rows"] if r["operation"] == "upload" and r is not upload)
    return [
        f"- One plain HTTP PUT of the same bytes (no SDK, no hashing) reached {raw['mb_per_s']} "
        f"MB/s: the server's own intake here. The store's upload reached {upload['mb_per_s']} MB/s "
        f"({100 * upload['mb_per_s'] / raw['mb_per_s']:.0f}% of that) while its own side spent "
        f"{upload['client_cpu_s']} CPU s (sha256, CRC32 per part, signing, copies): "
        f"{upload['client_mb_per_cpu_s']} MB per CPU second, so against a store that keeps up the "
        "client would not be what limits an upload below that rate.",
        f"- Downloads streamed at {download['mb_per_s']} MB/s (the artifact route's path).",
        f"- Upload memory: {upload['peak_rss_mb'] - upload['baseline_rss_mb']:.0f} MB above the "
        f"baseline for {upload['size_mb']:.0f} MB, "
        f"{small['peak_rss_mb'] - small['baseline_rss_mb']:.0f} MB for {small['size_mb']:.0f} MB "
        "(the bench's own 16 MiB source block included): parts in flight, not the object.",
        f"- moto's server peaked at {report['moto_server_peak_rss_mb']} MB RSS: it keeps objects "
        "in memory and temporary files and concatenates parts on completion.",
    ]


if __name__ == "__main__":
    main()
