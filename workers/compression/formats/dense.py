"""Float weights as they are: a standard Hugging Face folder with no `quantization_config`, which
transformers loads unchanged (pruned layers keep their zeros, `sparse_storage="dense"`)."""

from __future__ import annotations

from workers.compression.formats.layout import Layout


class Dense(Layout):
    kind = "dense"
    formats = ("dense",)
    float_storage = "dense"

    def write(self, model, layers, tensors, config):
        return "dense"

    def check_scheme(self, quantization):
        return "dense" if quantization is None else None

    def describe(self, quantization, model_class, slimformer_load):
        how = (
            f"```python\nfrom transformers import {model_class}, AutoTokenizer\n\n"
            f'model = {model_class}.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```'
            "\n\nSlimformer's runtime loads it the same way:\n\n" + slimformer_load
        )
        return "a dense float32 safetensors model.", how
