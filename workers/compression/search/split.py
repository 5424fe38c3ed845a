"""The search split: evaluation records the reported evaluation never reads.

The numbers a job reports are measured on the first `max_windows` perplexity windows (causal LM) or
the first `max_samples` texts (encoders) of the evaluation dataset; the search tunes on the texts
that come after them, so a result is never reported on the data it was chosen with.
"""

from __future__ import annotations

from workers.compression.data import special_tokens_around
from workers.compression.recipe import EvaluationSettings

MIN_SEARCH_TEXTS = 4


class SearchSplitError(ValueError):
    pass


def search_split(
    records: list[dict], settings: EvaluationSettings, tokenizer, task: str
) -> tuple[list[dict], dict]:
    """(records for the search, a description of the split for the report)."""
    texts = [record for record in records if record["text"].strip()]
    if task == "causal-lm":
        prefix, _ = special_tokens_around(tokenizer)
        content = settings.seq_len - len(prefix)
        stride = min(settings.stride or content, content)
        consumed = stride * (settings.max_windows - 1) + content  # tokens the reported windows read
        separator = len(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
        lengths = tokenizer(
            [record["text"] for record in texts], add_special_tokens=False, verbose=False
        )["input_ids"]
        offset, first = 0, len(texts)
        for index, ids in enumerate(lengths):
            if offset >= consumed:
                first = index
                break
            offset += len(ids) + separator
        how = f"evaluation texts after the first {consumed} tokens the reported perplexity reads"
    else:
        first = settings.max_samples
        how = f"evaluation texts after the first {first} the reported embeddings read"
    held_out = texts[first:]
    if len(held_out) < MIN_SEARCH_TEXTS:
        raise SearchSplitError(
            f"the evaluation dataset leaves {len(held_out)} texts after the reported evaluation's, "
            f"fewer than the {MIN_SEARCH_TEXTS} a search needs: give a larger evaluation dataset "
            "or lower evaluation.max_windows / max_samples"
        )
    return held_out, {"split": how, "first_text": first, "texts": len(held_out)}
