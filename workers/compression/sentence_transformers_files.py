"""The sentence-transformers files of an artifact whose source was a sentence-transformers model.

`SentenceTransformer(folder)` is how a sentence encoder such as all-MiniLM-L6-v2 is used: it reads
`modules.json` (the Transformer, then Pooling, then Normalize), `sentence_bert_config.json` (the
Transformer module's settings) and each module's folder (`1_Pooling/config.json`). Without them it
guesses mean pooling and no normalisation, which is not the model the source was. So an export of
such a source carries these files over, unchanged but for one setting.

That setting is why quantized artifacts need more than a copy. transformers loads a
compressed-tensors folder with its weights still compressed (int8, packed int4, FP8 in an
`nn.Linear`) and relies on a forward pre-hook of the top-level model to decompress them on the
first call. sentence-transformers 6 calls the model's `forward` method directly, so the hook never
runs and the first matrix multiply fails ("self and mat2 must have the same dtype, but got Float
and Char"). `sentence_bert_config.json` may pass `config_kwargs` to `AutoConfig.from_pretrained`;
this module writes there the folder's own `quantization_config` with `dequantize: true`, which
makes transformers dequantize the weights while loading (the route it takes for fine-tuning), so
the model sentence-transformers receives is an ordinary float one. The files on disk, and every
other loader (transformers, vLLM, Slimformer's runtime), are unaffected.

What is carried over is data, never code: only modules of sentence-transformers' own types whose
folders hold JSON (and, for Dense, safetensors) files; a source with anything else gets no
sentence-transformers files and is a plain transformers folder, as before.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
TOP_LEVEL_FILES = (MODULES_FILE, TRANSFORMER_CONFIG, "config_sentence_transformers.json")
# Module class names whose folders hold configuration (and, for Dense, float weights) only.
KNOWN_MODULES = {"Transformer", "Pooling", "Normalize", "Dense"}
MODULE_FILE_SUFFIXES = {".json", ".safetensors"}


def carried_modules(source: Path) -> list[dict] | None:
    """The modules of `source` if it is a sentence-transformers folder this module can carry over
    (see the module docstring), else None."""
    path = Path(source) / MODULES_FILE
    if not path.is_file() or not (Path(source) / TRANSFORMER_CONFIG).is_file():
        return None
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(modules, list) or not modules:
        return None
    for module in modules:
        kind = module.get("type", "") if isinstance(module, dict) else ""
        folder = module.get("path", "") if isinstance(module, dict) else None
        if (
            not kind.startswith("sentence_transformers.")
            or kind.rsplit(".", 1)[-1] not in KNOWN_MODULES
            or not isinstance(folder, str)
            or (kind.endswith(".Transformer") and folder != "")
            or "/" in folder
            or "\\" in folder
            or folder in (".", "..")
        ):
            log.info("not carrying sentence-transformers files over: module %r", module)
            return None
        files = sorted((Path(source) / folder).glob("*")) if folder else []
        if any(not f.is_file() or f.suffix not in MODULE_FILE_SUFFIXES for f in files):
            log.info("not carrying sentence-transformers files over: %s holds other files", folder)
            return None
    return modules


def write_sentence_transformers_files(source: Path, target: Path, config: dict) -> bool:
    """Copy the sentence-transformers files of `source` into the export folder `target`, whose
    config.json is `config`; whether there were any to copy. A quantized `config` gets the
    `dequantize` setting described in the module docstring."""
    modules = carried_modules(source)
    if modules is None:
        return False
    source, target = Path(source), Path(target)
    if not _pooling_fits(source, modules, config):
        return False
    for name in TOP_LEVEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    for module in modules:
        if module["path"] and (source / module["path"]).is_dir():
            (target / module["path"]).mkdir(exist_ok=True)
            for file in sorted((source / module["path"]).iterdir()):
                shutil.copyfile(file, target / module["path"] / file.name)
    quantization = config.get("quantization_config")
    if quantization is not None:
        settings = json.loads((target / TRANSFORMER_CONFIG).read_text(encoding="utf-8"))
        key = "config_args" if "config_args" in settings else "config_kwargs"
        settings[key] = {
            **(settings.get(key) or {}),
            "quantization_config": {**quantization, "dequantize": True},
        }
        text = json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (target / TRANSFORMER_CONFIG).write_text(text, encoding="utf-8")
    return True


def _pooling_fits(source: Path, modules: list[dict], config: dict) -> bool:
    """Whether the source's pooling still matches the exported model's width (a distilled
    student of another model may differ)."""
    for module in modules:
        if not module["type"].endswith(".Pooling"):
            continue
        pooling = source / module["path"] / "config.json"
        if not pooling.is_file():
            continue
        width = json.loads(pooling.read_text(encoding="utf-8")).get("word_embedding_dimension")
        if width is not None and width != config.get("hidden_size"):
            log.info("not carrying sentence-transformers files over: pooling width %s", width)
            return False
    return True


def has_sentence_transformers_files(folder: Path) -> bool:
    return (Path(folder) / MODULES_FILE).is_file()
