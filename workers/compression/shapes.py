"""The Linear layers a model has and their shapes, from its config alone (no weights are read).

The model is built on PyTorch's `meta` device, where tensors have shapes but no storage, so this
costs milliseconds and no memory whatever the model's size. The service stores the result when it
registers a model, so the API can refuse a recipe that cannot apply (a group size that does not
divide a layer's input width) at submission, without touching weights.
"""

from __future__ import annotations

from pathlib import Path


def describe_config(config, architecture: str | None = None) -> tuple[dict[str, list[int]], int]:  # noqa: ANN001
    """({module name: [out_features, in_features]} for every nn.Linear, parameter count) of the
    architecture (`architecture` overrides the config's, which a GGUF's metadata does not carry)."""
    import torch
    from torch import nn
    from transformers import AutoModel, AutoModelForCausalLM

    architecture = architecture or (getattr(config, "architectures", None) or [""])[0]
    auto = AutoModelForCausalLM if architecture.endswith("ForCausalLM") else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=False)
    shapes = {
        name: [module.out_features, module.in_features]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }
    return shapes, sum(parameter.numel() for parameter in model.parameters())


def describe_folder(
    folder: Path, architecture: str | None = None
) -> tuple[dict[str, list[int]], int]:
    """From `config.json`, or from the metadata of the folder's single GGUF file."""
    from transformers import AutoConfig

    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    else:
        (gguf,) = sorted(folder.glob("*.gguf"))
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf.name, trust_remote_code=False)
    return describe_config(config, architecture)
