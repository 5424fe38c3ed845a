"""FP8 (E4M3) weights, compressed-tensors `float-quantized`.

`<name>.weight` holds the FP8 values and `<name>.weight_scale` float32 [out, 1], one scale per
output channel; activations stay in float or are cast to FP8 per token at run time, as the
layer's config group says. The runtime module is `Fp8Linear` (`runtime/fp8.py`).
"""

from __future__ import annotations

from workers.compression.formats.layout import (
    ScaledLayout,
    float_layers_text,
    group_of,
    symmetric_8bit_args,
)
from workers.compression.runtime.fp8 import Fp8Linear, fp8_matmul_available

# FP8 (E4M3) per token, computed at run time; with "channel" and not dynamic, FP8 weights.
FP8_ACTIVATIONS = symmetric_8bit_args("float", "token", dynamic=True)
FP8_WEIGHTS = symmetric_8bit_args("float", "channel")


class FloatQuantized(ScaledLayout):
    kind = "fp8"
    formats = ("float-quantized",)

    def layers(self, model):
        return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}

    def write_layer(self, name, module):
        tensors = {f"{name}.weight": module.weight, f"{name}.weight_scale": module.weight_scale}
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias
        activations = FP8_ACTIVATIONS if module.dynamic_activations else None
        return tensors, {"weights": FP8_WEIGHTS, "input_activations": activations}

    def supports(self, group):
        weights = group.get("weights") or {}
        activations = group.get("input_activations")
        return (
            (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
            == ("float", 8, "channel")
            and weights.get("symmetric") is True
            and not weights.get("dynamic")
            and (
                activations is None
                or (activations.get("type"), activations.get("num_bits")) == ("float", 8)
                and (activations.get("dynamic"), activations.get("strategy")) == (True, "token")
            )
        )

    def build(self, name, stored, bias, quantization, context):
        dynamic = group_of(quantization, name).get("input_activations") is not None
        module = Fp8Linear(*stored[:2], bias, dynamic_activations=dynamic)
        device = context.device
        kernel = (
            "fp8"
            if dynamic and fp8_matmul_available(device)
            else "float: FP8 values computed in float (no FP8 matrix multiply "
            + ("for weight-only FP8)" if not dynamic else f"on {device.type})")
        )
        return module, kernel

    def describe(self, quantization, model_class, slimformer_load):
        dynamic = any(g["input_activations"] for g in quantization["config_groups"].values())
        layout = (
            "compressed-tensors `float-quantized`: FP8 (E4M3) weights with one float32 scale per "
            "output channel; activations "
            + ("are cast to FP8 per token at run time. " if dynamic else "stay in float. ")
            + float_layers_text(quantization)
        )
        how = (
            "vLLM runs it with FP8 kernels on GPUs that have them (compute capability 8.9+); "
            "transformers (with the `compressed-tensors` package) loads it as it is. With "
            "Slimformer (FP8 matrix multiplies where the GPU has them, float arithmetic on the FP8 "
            "values elsewhere):\n\n" + slimformer_load
        )
        return layout, how
