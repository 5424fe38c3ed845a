"""Writing compressed models as folders people can load, and proving that they load.

A dense model is a standard Hugging Face folder. Compressed models use the compressed-tensors
layouts that transformers (with the compressed-tensors package) and vLLM read, with a
`quantization_config` in config.json describing the scheme. Each layout is one object in
`formats/`: int8 weights and activations (`int-quantized`), weight-only 1-8 bit (`pack-quantized`),
FP8 (`float-quantized`), the sparse bitmask layouts, dense. This module runs the steps (write,
load, verify, describe) and asks the layout for everything format-specific.

`load_artifact` reads these folders back into a runnable model without compressed-tensors, with
the runtime modules of `runtime/` in place of the stored layers. One artifact holds one format; a
model mixing, say, dynamic int8 and weight-only layers is refused.

Writing has two phases, so that a job can test and measure the artifact before it describes it:
`write_draft` writes the weights, config and tokenizer into a private folder next to the target;
the draft loads (`ExportDraft.load`) and checks (`verify`) exactly as the published folder will;
`ExportDraft.publish` then writes the model card and `slimformer.json` once, with the final
metrics, and renames the folder into place. `save_model` does both at once.

Bytes are deterministic: tensors, config and metadata depend only on the model and the arguments
(no timestamps, JSON keys sorted), and the folder appears by one rename once every file is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from workers.compression import formats
from workers.compression.architectures import block_prefix_from_names
from workers.compression.export_streamed import agreement_report, check_streamed, write_streamed
from workers.compression.formats.layout import (
    WEIGHTS_FILE,
    ExportVerificationError,
    Layout,
    LoadContext,
    UnsupportedExportError,
)
from workers.compression.loading import (
    LoadedModel,
    UnsupportedModelError,
    load_model,
    load_tokenizer,
    publish_folder,
    read_architecture,
    task_of,
)
from workers.compression.model_card import model_card, read_front_matter
from workers.compression.model_inspection import sha256_file
from workers.compression.sentence_transformers_files import write_sentence_transformers_files
from workers.compression.shards import exact_in, weight_files
from workers.compression.streaming import store_of

__all__ = [
    "ExportCheck",
    "ExportDraft",
    "ExportVerificationError",
    "UnsupportedExportError",
    "load_artifact",
    "save_model",
    "verify",
    "verify_export",
    "write_draft",
]

METADATA_FILE = "slimformer.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportDraft:
    """An export written to `path`, a private folder next to `folder`, and not yet published: it
    has its weights, config and tokenizer, not yet its model card or `slimformer.json`. It holds
    no reference to the model it was written from."""

    path: Path
    folder: Path  # where `publish` puts it
    architecture: str
    task: str
    config: dict  # config.json as written
    storage_format: str
    records: dict  # what the layouts record in slimformer.json about the stored layers
    recipe: dict
    inputs: dict
    versions: dict
    source_card: dict  # the source model card's front matter (license, language), {} if none
    sentence_transformers: bool  # whether the folder holds the source's sentence-transformers files

    def load(self, *, device: torch.device | str | None = None) -> LoadedModel:
        """The draft loaded exactly as `load_artifact` will load the published folder."""
        return _load(self.path, device=device, records=self.records)

    def publish(self, *, metrics: dict) -> list[Path]:
        """Write the model card and `slimformer.json` (with the sha256 of every other file), then
        rename the draft into place. Returns the files of the published folder, sorted. If this
        fails the draft is discarded (`folder` must not exist yet, or be empty)."""
        if not self.path.is_dir():
            raise RuntimeError(f"the draft {self.path} was published or discarded already")
        try:
            (self.path / "README.md").write_text(
                model_card(
                    self.architecture,
                    self.task,
                    self.config,
                    recipe=self.recipe,
                    metrics=metrics,
                    inputs=self.inputs,
                    source=self.source_card,
                    sentence_transformers=self.sentence_transformers,
                ),
                encoding="utf-8",
            )
            _write_json(
                self.path / METADATA_FILE,
                {
                    "format": self.storage_format,
                    "architecture": self.architecture,
                    "task": self.task,
                    "recipe": self.recipe,
                    "metrics": metrics,
                    "inputs": self.inputs,
                    "versions": self.versions,
                    **self.records,
                    "files": _file_hashes(self.path),
                },
            )
            publish_folder(self.path, self.folder)
        except BaseException:
            self.discard()
            raise
        return sorted(path for path in self.folder.rglob("*") if path.is_file())

    def discard(self) -> None:
        """Remove the draft (nothing, once published)."""
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass(frozen=True)
class ExportCheck:
    """What `verify` found: the comparison, and the artifact it loaded to make it."""

    report: dict
    artifact: LoadedModel | None  # None for a streamed model: not loaded whole


def write_draft(
    loaded: LoadedModel,
    model: nn.Module,
    folder: Path,
    *,
    recipe: dict,
    inputs: dict,
    versions: dict | None = None,
    sparse_storage: str = "bitmask",
    progress: Callable[[int, int, str], None] | None = None,
) -> ExportDraft:
    """Write `model` (the compressed form of `loaded`) as a draft of `folder`: weights, config,
    generation config and tokenizer, in a private folder next to it, and the sentence-transformers
    files of a source that has them (`sentence_transformers_files.py`). Pruned layers of a float
    model are stored in a compressed-tensors bitmask layout (`sparse_storage="bitmask"`, smaller;
    `formats/sparse_bitmask.py`) or as dense weights with their zeros (`"dense"`, what plain
    transformers can read). `progress(done, total, detail)` follows the writing: block by block
    for a streamed model, else the weights, then the other files."""
    folder = Path(folder)

    def report(done: int, total: int, detail: str) -> None:
        if progress is not None:
            progress(done, total, detail)

    folder.parent.mkdir(parents=True, exist_ok=True)
    layout, layers = formats.layout_writing(model, sparse_storage=sparse_storage)
    config = json.loads(model.config.to_json_string())  # what save_pretrained writes
    config.pop("quantization_config", None)
    config["architectures"] = [loaded.architecture]  # as save_pretrained records it
    records = {
        key: value for each in formats.layouts() for key, value in each.records(model).items()
    }
    temporary = Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent)
    )
    try:
        if store_of(model) is not None:  # never whole in memory: shards, block by block
            steps = len(store_of(model)) + 1
            storage_format = write_streamed(
                model,
                layout,
                layers,
                temporary,
                config,
                dtype=loaded.dtype,
                progress=lambda done, blocks: report(done, steps, f"block {done}/{blocks}"),
            )
        else:
            # The layouts read the float weights on CPU; the tensors they add may come from any
            # device.
            steps = 3
            # In the checkpoint's dtype where that is exact (a bf16 model is held in float32):
            # untouched tensors go back as they came, as the streamed export writes them.
            tensors = _narrowed(_on_cpu(_float_tensors(model, layout, layers)), loaded.dtype)
            storage_format = layout.write(model, layers, tensors, config)
            report(1, steps, "weights laid out")
            safetensors.torch.save_file(
                _on_cpu(tensors), temporary / WEIGHTS_FILE, metadata={"format": "pt"}
            )
            report(2, steps, "weights written")
        _write_json(temporary / "config.json", config)
        if loaded.task == "causal-lm" and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        loaded.tokenizer.save_pretrained(temporary)
        sentence_transformers = layout.plain_transformers and write_sentence_transformers_files(
            loaded.folder, temporary, config
        )
        report(steps, steps, "config and tokenizer written")
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return ExportDraft(
        path=temporary,
        folder=folder,
        architecture=loaded.architecture,
        task=loaded.task,
        config=config,
        storage_format=storage_format,
        records=records,
        recipe=recipe,
        inputs=inputs,
        versions=versions if versions is not None else library_versions(),
        source_card=read_front_matter(loaded.folder),
        sentence_transformers=sentence_transformers,
    )


def save_model(
    loaded: LoadedModel,
    model: nn.Module,
    folder: Path,
    *,
    recipe: dict,
    metrics: dict,
    inputs: dict,
    versions: dict | None = None,
    sparse_storage: str = "bitmask",
) -> list[Path]:
    """Write `model` (the compressed form of `loaded`) to `folder`, which must not exist yet or be
    empty: `write_draft`, then publish it. Returns the files written, sorted."""
    draft = write_draft(
        loaded,
        model,
        folder,
        recipe=recipe,
        inputs=inputs,
        versions=versions,
        sparse_storage=sparse_storage,
    )
    return draft.publish(metrics=metrics)


def _float_tensors(
    model: nn.Module, layout: Layout, layers: dict[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """The state-dict tensors `layout` does not write itself. Tied weights are written once, under
    the name transformers expects (the embedding), as `save_pretrained` does."""
    tensors = {
        key: value
        for key, value in model.state_dict().items()
        if not any(layout.replaces(key, name) for name in layers)
    }
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        tied = target in tensors and source in tensors
        if tied and tensors[target].data_ptr() == tensors[source].data_ptr():
            del tensors[target]
    return tensors


def _narrowed(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        key: value.to(dtype) if exact_in(value, dtype) else value for key, value in tensors.items()
    }


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def load_artifact(folder: Path, *, device: torch.device | str | None = None) -> LoadedModel:
    """Load any folder `save_model` writes. Dense ones load as transformers loads them (on
    `device`, default `select_device()`). Compressed ones are built as the float architecture from
    config.json with a runtime module in place of every quantized layer (default device: CPU):
    for `int-quantized`, `W8A8Linear` (int8 x int8 products; per-token or static activation
    scales as stored) or, for the layers `slimformer.json` lists as dynamic_int8's, torch's
    dynamic int8 Linear (CPU only); for `float-quantized`, `Fp8Linear`; for `pack-quantized`, the
    CPU int4 or int8 weight-only kernels of `runtime/weight_only.py`, or, on another device or
    where no kernel fits a layer, an nn.Linear holding the exactly dequantized weight. Pruned
    layers stored in a bitmask layout are expanded to dense float weights.
    `model.slimformer_runtime` says what runs: {"kernels": {kind: layer count}, "fallbacks":
    {layer: why it runs in float}}. Safetensors only."""
    folder = Path(folder)
    metadata_path = folder / METADATA_FILE
    records = (
        json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.exists() else {}
    )
    return _load(folder, device=device, records=records)


def _load(
    folder: Path,
    *,
    device: torch.device | str | None,
    records: dict,
    blocks: int | None = None,
) -> LoadedModel:
    """`load_artifact` of `folder`, with `records` what its slimformer.json records (or will).
    `blocks`: only the model's first `blocks` blocks, as a model of that depth (the load test of
    an artifact too large to load whole)."""
    quantization = _read_config(folder).get("quantization_config")
    layout, _ = formats.layout_reading(quantization)
    if quantization is None and blocks is None:  # a plain transformers folder
        return load_model(folder, device=device)
    context = LoadContext(
        device=torch.device(device if device is not None else "cpu"), records=records
    )
    architecture = read_architecture(folder)
    task = task_of(architecture)
    state = _read_weights(folder, blocks=blocks)
    layers = layout.read(state, quantization, context) if quantization is not None else {}

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    # Build the plain float architecture; the stored layers' runtime modules go in below.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if blocks is not None:
        _truncate(config, blocks)
    model_class = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    if blocks is None:
        model = model_class.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
    else:
        # A prefix is loaded where memory is short: no random initialisation to overwrite, the
        # stored tensors become the parameters (float32, as every artifact computes).
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = model_class.from_config(config, dtype=torch.float32)
        # Upcast one tensor at a time (never the prefix twice); the embeddings and head stay in
        # their stored dtype and compute in float32, as the engine's streamed model does.
        from workers.compression.streaming import NATIVE_SKELETON_NUMEL, compute_in_float32

        blocks_name = block_prefix_from_names(list(state))
        for key, value in state.items():
            native = value.numel() >= NATIVE_SKELETON_NUMEL and not (
                blocks_name is not None and key.startswith(blocks_name)
            )
            if value.is_floating_point() and not native:
                state[key] = value.float()
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        compute_in_float32(model)
    tied = getattr(model, "all_tied_weights_keys", {})
    absent = [
        key
        for key in missing
        if key.removesuffix(".weight") not in layers and not (key in tied and tied[key] in state)
    ]
    if unexpected or absent:
        raise UnsupportedModelError(
            f"weights do not match {architecture}: "
            f"unexpected {unexpected[:5]}, missing {absent[:5]}"
        )
    runtime: dict = {"kernels": {}, "fallbacks": {}}
    for name, stored in layers.items():
        linear = model.get_submodule(name)
        shape = layout.shape(stored)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != shape:
            raise UnsupportedModelError(f"{name} is not a Linear of shape {shape}")
        module, kernel = layout.build(name, stored, linear.bias, quantization, context)
        if kernel.startswith("float: "):
            runtime["fallbacks"][name] = kernel.removeprefix("float: ")
            kernel = "float"
        runtime["kernels"][kernel] = runtime["kernels"].get(kernel, 0) + 1
        model.set_submodule(name, module)
    if runtime["fallbacks"]:
        log.warning(
            "%d of %d quantized layers run dequantized in float: %s",
            len(runtime["fallbacks"]),
            len(layers),
            runtime["fallbacks"],
        )
    model.to(context.device).eval()
    model.slimformer_runtime = runtime
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(folder, task),
        task=task,
        architecture=architecture,
        folder=folder,
    )


def _read_weights(folder: Path, *, blocks: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files (one file, or the shards of its index); with
    `blocks`, only those outside the blocks and in the first `blocks` of them."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safetensors.safe_open(path, "pt") as stored:
            keys = list(stored.keys())
            prefix = block_prefix_from_names(keys) if blocks is not None else None
            for key in keys:
                if prefix is not None and key.startswith(prefix):
                    index = key[len(prefix) :].split(".", 1)[0]
                    if index.isdigit() and int(index) >= blocks:
                        continue
                state[key] = stored.get_tensor(key)
    return state


def _truncate(config, blocks: int) -> None:
    """Make `config` describe the model's first `blocks` blocks only."""
    config.num_hidden_layers = blocks
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:blocks]


def verify(
    export: ExportDraft | Path | str,
    model_in_memory: nn.Module,
    loaded_task: str,
    sample_input_ids: torch.Tensor,
) -> ExportCheck:
    """Load the artifact (a draft, or a published folder) the documented way and check that it
    computes what the model in memory does, and that every layer its layout stores exactly (packed
    codes, sparse weights) is bit for bit the in-memory one. Raises ExportVerificationError if not;
    otherwise returns the comparison with the artifact it loaded, for the caller to measure."""
    device = next(model_in_memory.parameters()).device
    if store_of(model_in_memory) is not None:
        return _verify_streamed(export, model_in_memory, loaded_task, sample_input_ids, device)
    if isinstance(export, ExportDraft):
        folder, artifact = export.path, export.load(device=device)
    else:
        folder = Path(export)
        artifact = load_artifact(folder, device=device)
    quantization = _read_config(folder).get("quantization_config")
    exact: dict = {}
    for layout in formats.layouts():  # each checks the model's layers of its own kind
        exact.update(layout.verify(folder, quantization, artifact.model, model_in_memory))
    ids = sample_input_ids.to(device)
    with torch.inference_mode():
        expected = _outputs(model_in_memory, loaded_task, ids)
        actual = _outputs(artifact.model, loaded_task, ids)
    layout, _ = formats.layout_reading(quantization)
    report = agreement_report(
        expected,
        actual,
        layout,
        getattr(artifact.model, "slimformer_runtime", None),
        facts={"loaded_as": type(artifact.model).__name__},
        exact=exact,
    )
    return ExportCheck(report=report, artifact=artifact)


def _verify_streamed(
    export: ExportDraft | Path | str,
    model: nn.Module,
    task: str,
    sample_input_ids: torch.Tensor,
    device: torch.device,
) -> ExportCheck:
    """`verify` for a model too large to load whole (`export_streamed.check_streamed`): every
    shard checked, the largest prefix of blocks that fits loaded and run. The check holds no
    artifact to measure: the caller measures the engine's model, which the check compared."""
    if isinstance(export, ExportDraft):
        folder, records = export.path, export.records
    else:
        folder = Path(export)
        metadata = folder / METADATA_FILE
        records = json.loads(metadata.read_text(encoding="utf-8")) if metadata.exists() else {}
    quantization = _read_config(folder).get("quantization_config")
    layout, _ = formats.layout_reading(quantization)
    report = check_streamed(
        folder,
        model,
        layout,
        task,
        sample_input_ids,
        records=records,
        load_prefix=lambda blocks: _load(folder, device=device, records=records, blocks=blocks),
    )
    return ExportCheck(report=report, artifact=None)


def verify_export(
    export: ExportDraft | Path | str,
    model_in_memory: nn.Module,
    loaded_task: str,
    sample_input_ids: torch.Tensor,
) -> dict:
    """`verify`'s report alone."""
    return verify(export, model_in_memory, loaded_task, sample_input_ids).report


def _outputs(model: nn.Module, task: str, ids: torch.Tensor) -> torch.Tensor:
    if task == "causal-lm":
        return model(input_ids=ids, use_cache=False).logits.float()
    return model(input_ids=ids).last_hidden_state.float()


def library_versions() -> dict:
    try:
        slimformer = importlib.metadata.version("slimformer")
    except importlib.metadata.PackageNotFoundError:
        slimformer = "unknown"
    return {
        "python": platform.python_version(),
        "safetensors": safetensors.__version__,
        "slimformer": slimformer,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def _write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def _file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in `folder` but slimformer.json."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != METADATA_FILE
    }
