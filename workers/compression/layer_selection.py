"""Which Linear layers a quantizing or pruning stage touches (`modules`, `ignore`).

By default a stage touches every nn.Linear inside the model's blocks: the repeated encoder or
decoder layers. That leaves out the embeddings, a causal LM's `lm_head` (its output logits are the
most quantization-sensitive tensor, and it is usually tied to the embedding) and BERT's pooler.
`modules` replaces that default with type names (`Linear`) or name patterns; `ignore` then removes
names (`architectures.matches`). The rules are `architectures.select_layers`, which the API also
applies to a model's Linear names at submission; here they meet the module tree.
"""

from __future__ import annotations

from torch import nn

from workers.compression.architectures import select_layers
from workers.compression.recipe import StageConfig


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
    layer_types = {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    return select_layers(
        layer_types,
        modules=stage.modules,
        ignore=stage.ignore,
        # Only the default needs the blocks, and a model without them is fine when `modules` names
        # the layers.
        blocks=block_prefix(model) if stage.modules is None else None,
    )


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
