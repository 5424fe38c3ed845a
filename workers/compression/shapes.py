"""The Linear layers a model has and their shapes, from its config alone (no weights are read).

The model is built on PyTorch's `meta` device, where tensors have shapes but no storage, so this
costs milliseconds and no memory whatever the model's size. The service stores the result when it
registers a model, so the API can refuse a recipe that cannot apply (a group size that does not
divide a layer's input width) at submission, without touching weights.
"""

from __future__ import annotations

from pathlib import Path


def _meta_model(config, architecture: str | None):  # noqa: ANN001, ANN202
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    architecture = architecture or (getattr(config, "architectures", None) or [""])[0]
    auto = AutoModelForCausalLM if architecture.endswith("ForCausalLM") else AutoModel
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=False)


def describe_config(config, architecture: str | None = None) -> tuple[dict[str, list[int]], int]:  # noqa: ANN001
    """({module name: [out_features, in_features]} for every nn.Linear, parameter count) of the
    architecture (`architecture` overrides the config's, which a GGUF's metadata does not carry)."""
    from torch import nn

    model = _meta_model(config, architecture)
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


def shape_mismatches(folder: Path, stored: dict[str, list[int]]) -> list[str]:
    """The stored tensors whose shapes are not the ones `config.json` gives their names (a config
    that lies about its model is refused at registration, not at the first job). A stored name is
    matched with or without the architecture's base-model prefix (`model.`, `bert.`); names the
    architecture does not have are left to the loader."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model = _meta_model(config, None)
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    wrong = []
    for name, shape in sorted(stored.items()):
        for candidate in (name, prefix + name, name.removeprefix(prefix)):
            if candidate in expected:
                if expected[candidate] != list(shape):
                    wrong.append(
                        f"{name}: config.json gives {expected[candidate]}, the weights hold "
                        f"{list(shape)}"
                    )
                break
    return wrong
