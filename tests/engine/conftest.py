"""Tiny random models and a word-level tokenizer, built in memory: fast and hub-free.

The real shipped models (MiniLM, SmolLM2) are used only by tests marked `real_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from workers.compression.loading import LoadedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "the river was used for music and film in the city",
    "a small team made the first model of the world",
    "after the war the university had many new school years",
    "she was known for her game in the north and the south",
    "int8 weight layer token text",
    "the national state has a city which is on the river",
    "two of them were later known as the most fast team",
    "it is one of the only games that can be used in school",
]
WORDS = sorted({word for sentence in SENTENCES for word in sentence.split()})
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
VOCAB_SIZE = 128  # room above the words, so random ids stay valid


def word_tokenizer(*, wrap: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; `wrap` adds [CLS] … [SEP] around each text, like BERT."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if wrap:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_max_length=64,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


def tiny_llama(*, tie: bool = True, layers: int = 2, hidden: int = 32) -> LoadedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=4,
        eos_token_id=5,
        pad_token_id=5,
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, word_tokenizer(), "causal-lm", "LlamaForCausalLM", Path("tiny"))


def tiny_bert(*, layers: int = 2) -> LoadedModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = BertModel(config).eval()
    return LoadedModel(
        model, word_tokenizer(wrap=True), "feature-extraction", "BertModel", Path("tiny")
    )


@pytest.fixture
def llama() -> LoadedModel:
    return tiny_llama()


@pytest.fixture
def make_llama():
    return tiny_llama


@pytest.fixture
def bert() -> LoadedModel:
    return tiny_bert()


@pytest.fixture
def records() -> list[dict]:
    return [{"text": sentence} for sentence in SENTENCES * 4]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where SmolLM2 is converted; set SLIMFORMER_TEST_CACHE to keep it between runs."""
    configured = os.environ.get("SLIMFORMER_TEST_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("cache")
