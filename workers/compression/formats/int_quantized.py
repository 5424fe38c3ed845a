"""int8 weights and activations, compressed-tensors `int-quantized`.

`<name>.weight` holds the int8 values and `<name>.weight_scale` the float32 scales ([out, 1] per
channel, [1] per tensor); no zero points (symmetric); activations are quantized per token at run
time, or with the calibrated `<name>.input_scale` [1] when static (w8a8).

Two runtime modules store this way (`runtime/int8.py`): `W8A8Linear` (w8a8, int8 x int8 products
with per-token or static activation scales) and torch's dynamic int8 Linear (dynamic_int8, CPU
only, per-tensor activations). The files do not tell them apart, so slimformer.json records which
layers are torch's and the loader builds those again as torch's.
"""

from __future__ import annotations

from torch.ao.nn.quantized import dynamic as nnqd

from workers.compression.formats.layout import ScaledLayout, float_layers_text, symmetric_8bit_args
from workers.compression.runtime.int8 import W8A8Linear, int8_linear, int8_weight_and_scale

# Dynamic int8: activations quantized to int8 per token on the fly (vLLM; Slimformer's CPU runtime
# does that for w8a8 layers, and uses torch's per-tensor dynamic kernels for dynamic_int8 layers).
DYNAMIC_INT8_ACTIVATIONS = symmetric_8bit_args("int", "token", dynamic=True)
# Static int8: one calibrated scale per layer input (`<name>.input_scale`).
STATIC_INT8_ACTIVATIONS = symmetric_8bit_args("int", "tensor")
TORCH_DYNAMIC_LAYERS = "torch_dynamic_int8_layers"  # the slimformer.json key


class IntQuantized(ScaledLayout):
    kind = "int8"
    formats = ("int-quantized",)

    def layers(self, model):
        return {n: m for n, m in model.named_modules() if isinstance(m, nnqd.Linear | W8A8Linear)}

    def write_layer(self, name, module):
        tensors = {}
        if isinstance(module, W8A8Linear):
            q, scale, bias = module.weight, module.weight_scale, module.bias
            if not module.dynamic:
                tensors[f"{name}.input_scale"] = module.input_scale
            activations = DYNAMIC_INT8_ACTIVATIONS if module.dynamic else STATIC_INT8_ACTIVATIONS
        else:
            q, scale = int8_weight_and_scale(module)
            bias, activations = module.bias(), DYNAMIC_INT8_ACTIVATIONS
        tensors[f"{name}.weight"] = q
        tensors[f"{name}.weight_scale"] = scale
        if bias is not None:
            tensors[f"{name}.bias"] = bias
        strategy = "channel" if scale.dim() == 2 else "tensor"  # [out, 1] or [1]
        weights = symmetric_8bit_args("int", strategy)
        return tensors, {"weights": weights, "input_activations": activations}

    def records(self, model):
        # Which int8 layers run torch's per-tensor dynamic kernels (dynamic_int8) rather than
        # per-token activations (w8a8): the file format does not tell them apart.
        return {
            TORCH_DYNAMIC_LAYERS: sorted(
                name for name, m in model.named_modules() if isinstance(m, nnqd.Linear)
            )
        }

    def supports(self, group):
        weights = group.get("weights") or {}
        return (
            weights.get("num_bits") == 8
            and weights.get("type") == "int"
            and weights.get("symmetric") is True
            and weights.get("strategy") in ("channel", "tensor")
            and _activations_supported(group.get("input_activations"))
        )

    def read(self, state, quantization, context):
        if context.records.get(TORCH_DYNAMIC_LAYERS) and context.device.type != "cpu":
            raise ValueError("dynamic int8 models run on CPU only")
        return super().read(state, quantization, context)

    def build(self, name, stored, bias, quantization, context):
        weight, weight_scale, input_scale = stored
        if name in context.records.get(TORCH_DYNAMIC_LAYERS, []):
            return int8_linear(weight, weight_scale, bias), "dynamic-int8"
        module = W8A8Linear(weight, weight_scale, input_scale, bias)
        return module, "w8a8-dynamic" if input_scale is None else "w8a8-static"

    def describe(self, quantization, model_class, slimformer_load):
        groups = quantization["config_groups"].values()
        strategies = sorted({group["weights"]["strategy"] for group in groups})
        static = any(not group["input_activations"]["dynamic"] for group in groups)
        layout = (
            "compressed-tensors `int-quantized`: int8 weights (symmetric, per "
            f"{' / per '.join(strategies)}) with float32 scales; activations are quantized to int8 "
            + (
                "with one calibrated scale per layer (`input_scale`). "
                if static
                else "per token at run time. "
            )
            + float_layers_text(quantization)
        )
        how = (
            "With Slimformer (int8 x int8 kernels; dynamic_int8 layers use torch's CPU dynamic "
            "int8 kernels, which quantize activations per tensor):\n\n"
            + slimformer_load
            + "\n\ntransformers (with the `compressed-tensors` package installed) and vLLM read "
            "the `quantization_config` in config.json directly."
        )
        return layout, how


def _activations_supported(activations: dict | None) -> bool:
    """Symmetric int8 activations, per token at run time or one static scale per tensor."""
    return (
        activations is not None
        and activations.get("type") == "int"
        and activations.get("num_bits") == 8
        and activations.get("symmetric") is True
        and (activations.get("dynamic"), activations.get("strategy"))
        in ((True, "token"), (False, "tensor"))
    )
