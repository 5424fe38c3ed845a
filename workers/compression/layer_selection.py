"""Which Linear layers a quantizing or pruning stage touches (`modules`, `ignore`).

By default a stage touches every nn.Linear inside the model's blocks: the repeated encoder or
decoder layers. That leaves out the embeddings, a causal LM's `lm_head` (its output logits are the
most quantization-sensitive tensor, and it is usually tied to the embedding) and BERT's pooler.
`modules` replaces that default with type names (`Linear`) or name patterns; `ignore` then removes
names. A pattern matches a full module name with fnmatch, or its dotted tail: `q_proj` matches
`model.layers.0.self_attn.q_proj`, `lm_head` matches `lm_head`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from workers.compression.recipe import StageConfig


def matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def block_prefix(model: nn.Module) -> str:
    """Name of the model's block list: the longest nn.ModuleList whose items share one class
    (`encoder.layer` in BERT, `model.layers` in Llama)."""
    best_name, best_len = None, 0
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > best_len
            and len({type(child) for child in module}) == 1
        ):
            best_name, best_len = name, len(module)
    if best_name is None:
        raise ValueError("cannot find the model's blocks; name the layers to touch with `modules`")
    return best_name + "."


def linear_layers(model: nn.Module, stage: StageConfig) -> tuple[list[str], list[str]]:
    """(targeted, skipped): names of the nn.Linear modules the stage touches and of those it
    leaves alone, in module order."""
    if stage.modules is None:
        prefix = block_prefix(model)

        def wanted(name: str, module: nn.Module) -> bool:
            return name.startswith(prefix)
    else:

        def wanted(name: str, module: nn.Module) -> bool:
            return any(
                type(module).__name__ == pattern or matches(name, pattern)
                for pattern in stage.modules
            )

    targeted, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        ignored = any(matches(name, pattern) for pattern in stage.ignore)
        (targeted if wanted(name, module) and not ignored else skipped).append(name)
    return targeted, skipped


def untie_targeted(model: nn.Module, stage: StageConfig) -> list[str]:
    """Give each Linear the stage targets its own weight when it shares it with another module
    (a causal LM's `lm_head` tied to the input embedding): methods change weights in place, and
    quantizing or pruning the head must not change the embedding. Returns the untied names."""
    targeted, _ = linear_layers(model, stage)
    owners: dict[int, int] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    untied = []
    for name in targeted:
        linear = model.get_submodule(name)
        if owners.get(id(linear.weight), 0) > 1:
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            untied.append(name)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if untied and output is not None and any(model.get_submodule(n) is output for n in untied):
        model.config.tie_word_embeddings = False
    return untied
