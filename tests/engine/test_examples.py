"""The built-in datasets and models, read from the installed example packages."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from workers.compression import examples
from workers.compression.examples import (
    BUILTIN_DATASETS,
    BUILTIN_MODELS,
    builtin_dataset_jsonl,
    builtin_model_folder,
)


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in builtin_dataset_jsonl(name).decode("utf-8").splitlines()]


def test_listing_the_examples_does_not_import_torch():
    code = (
        "import sys, workers.compression, workers.compression.examples as b, "
        "workers.compression.recipe\n"
        "assert all(m.available for m in b.BUILTIN_MODELS.values())\n"
        "assert all(d.available for d in b.BUILTIN_DATASETS.values())\n"
        "assert 'torch' not in sys.modules and 'gensim' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_enwiki_splits_by_article_without_overlap():
    calibration, evaluation = records("enwiki-calibration"), records("enwiki-evaluation")
    assert len(calibration) > 3000 and len(evaluation) > 500
    assert sum(len(r["text"].split()) for r in evaluation) > 50_000  # words
    calibration_texts = {r["text"] for r in calibration}
    evaluation_texts = {r["text"] for r in evaluation}
    assert not calibration_texts & evaluation_texts
    source = examples._package_file("gensim", f"test/test_data/{examples._ENWIKI}")
    articles = examples._enwiki_articles(source)
    assert len(articles) > 90
    for title, paragraphs in articles:
        sides = {
            "evaluation"
            if p in evaluation_texts
            else "calibration"
            if p in calibration_texts
            else None
            for p in paragraphs
        }
        assert len(sides) == 1 and None not in sides, title  # a whole article lands on one side


def test_enwiki_is_clean_prose():
    texts = [r["text"] for r in records("enwiki-evaluation")]
    for marker in ("{{", "}}", "[[", "]]", "<ref", "&nbsp;", "'''", "thumb|", "http://"):
        assert not any(marker in text for text in texts), marker
    assert any(
        text.startswith("Anarchism is a political philosophy")
        for text in (
            r["text"] for r in records("enwiki-calibration") + records("enwiki-evaluation")
        )
    )


def test_datasets_are_deterministic_bytes():
    first = {name: builtin_dataset_jsonl(name) for name in BUILTIN_DATASETS}
    examples._enwiki_articles.cache_clear()
    assert {name: builtin_dataset_jsonl(name) for name in BUILTIN_DATASETS} == first


def test_polarity_has_200_labelled_sentences():
    rows = records("polarity")
    assert len(rows) == 200
    assert collections.Counter(row["label"] for row in rows) == {"pos": 100, "neg": 100}
    assert all(row["text"] and not row["text"].startswith("__label__") for row in rows)
    assert any("—" in row["text"] for row in rows)  # Windows-1252 decoded, not mojibake


def test_lee_sentences_are_news_sentences():
    rows = records("lee-sentences")
    assert len(rows) > 2500 and all(set(row) == {"text"} for row in rows)
    assert rows[0]["text"].startswith("The national executive of the strife-torn Democrats")
    assert sum(row["text"].endswith((".", "?", "!", '"')) for row in rows) > 0.95 * len(rows)
    assert not any(row["text"].endswith((" Mr.", " Dr.", " U.S.")) for row in rows)


def test_minilm_ships_as_a_plain_safetensors_folder(tmp_path):
    folder = builtin_model_folder("all-MiniLM-L6-v2", tmp_path)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert not any(tmp_path.iterdir())  # used in place, nothing copied
    assert BUILTIN_MODELS["all-MiniLM-L6-v2"].architecture == "BertModel"


def test_unknown_names_are_key_errors(tmp_path):
    with pytest.raises(KeyError):
        builtin_dataset_jsonl("wikitext")
    with pytest.raises(KeyError):
        builtin_model_folder("gpt2", tmp_path)
