"""What the CLI shows: the live progress bar of a job, tables of jobs, metrics and artifacts, and
sizes, durations and times as people read them. The SDK (`slimformer.client`) knows none of it."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

PROGRESS_STEPS = 1000  # the bar counts permille: tqdm draws float totals poorly


class ProgressView:
    """A tqdm bar fed by progress events, with status changes printed above it (on stderr): the
    server's label ("stage 1 of 2 · gptq · block 12/30"), its one ETA, and a full bar once the
    job succeeded."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = tqdm(
            total=PROGRESS_STEPS,
            file=sys.stderr,
            disable=None if enabled else True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}",
            desc="queued",
        )
        self.phase: int | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        kind = event.get("type")
        if kind == "status":
            status = data.get("status") or "?"
            self.bar.set_description_str(status)
            if status == "succeeded":
                self.bar.n = PROGRESS_STEPS
                self.bar.set_postfix_str("", refresh=False)
            self.bar.refresh()
            self.say(event.get("message") or f"status: {status}")
        elif kind == "progress":
            self.progress(data, event.get("message"))
        elif kind == "metric" or (kind == "log" and event.get("level") in ("warning", "error")):
            self.say(f"{event.get('level', 'info')}: {event.get('message', '')}")

    def progress(self, data: dict[str, Any], message: str | None) -> None:
        label = stage_label(data)
        phase = data.get("stage_index")
        if phase != self.phase and data.get("stage"):
            self.phase = phase
            self.say(label)
        self.bar.set_description_str(label)
        fraction = data.get("fraction")
        if isinstance(fraction, int | float):
            # Never backwards: a late event must not undo what the bar showed.
            self.bar.n = max(self.bar.n, round(min(max(fraction, 0.0), 1.0) * PROGRESS_STEPS))
        eta = data.get("eta_s")
        self.bar.set_postfix_str(f"eta {format_duration(eta)}" if is_number(eta) else "", False)
        self.bar.refresh()

    def say(self, line: str) -> None:
        if self.enabled:
            tqdm.write(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def stage_label(progress: dict[str, Any]) -> str:
    """The server's `label` ("stage 1 of 2 · gptq · block 12/30"); from a server without it,
    `gptq (stage 1 of 2)` where the progress names a recipe stage, else the phase's name."""
    if progress.get("label"):
        return str(progress["label"])
    stage = progress.get("stage") or "-"
    index, total = progress.get("recipe_stage_index"), progress.get("recipe_num_stages")
    if isinstance(index, int) and isinstance(total, int):
        return f"{stage} (stage {index + 1} of {total})"
    return str(stage)


# --- Formatting ---------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_metric(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    if name.endswith("_bytes"):
        return format_bytes(value)
    if name == "sparsity":
        return f"{value:.1%}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def format_table(rows: list[list[str]], headers: list[str] | None = None) -> str:
    lines = [headers, *rows] if headers else rows
    if not lines:
        return ""
    widths = [max(len(str(cell)) for cell in column) for column in zip(*lines, strict=True)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def metrics_table(metrics: dict[str, Any]) -> str:
    """Baseline against compressed for every numeric metric both sides (or either) report."""
    baseline = metrics.get("baseline") or {}
    compressed = metrics.get("compressed") or {}
    rows = []
    for name in dict.fromkeys([*baseline, *compressed]):
        before, after = baseline.get(name), compressed.get(name)
        if not any(is_number(v) for v in (before, after)):
            continue  # settings (device, dataset sha256) are not comparisons
        change = ""
        if is_number(before) and is_number(after) and before:
            change = f"{(after - before) / abs(before):+.1%}"
        rows.append([name, format_metric(name, before), format_metric(name, after), change])
    return format_table(rows, ["metric", "baseline", "compressed", "change"])


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe_recipe(recipe: dict[str, Any] | None) -> str:
    stages = (recipe or {}).get("stages") or []
    return " → ".join(stage.get("method", "?") for stage in stages) or "-"


def progress_cell(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    if job.get("status") not in ("running", "cancelling"):
        return "-"
    fraction = progress.get("fraction")
    label = stage_label(progress) if progress.get("stage") else ""
    return f"{label} {fraction:.0%}".strip() if is_number(fraction) else label or "-"


def short_time(timestamp: str | None) -> str:
    return (timestamp or "-").replace("T", " ")[:19]


def artifacts_table(artifacts: list[dict[str, Any]]) -> str:
    return format_table(
        [
            [
                a["id"],
                a.get("kind", "-"),
                a.get("format") or "-",
                format_metric("size_bytes", a.get("size_bytes")),
                a.get("filename") or "-",
            ]
            for a in artifacts
        ],
        ["artifact", "kind", "format", "size", "filename"],
    )


class DownloadBar:
    """A tqdm bar for `Client.download(progress=…)`."""

    def __init__(self, label: str, *, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=total,
                initial=done,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.label,
                file=sys.stderr,
                disable=None if self.enabled else True,
            )
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
