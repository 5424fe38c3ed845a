"""The modules a compressed model runs as: what `export.load_artifact` builds from stored tensors,
and what the methods build in memory, so a job measures what users run.

- `int8`: int8 weights with int8 activations (`W8A8Linear`; torch's dynamic int8 Linear);
- `fp8`: FP8 (E4M3) weights (`Fp8Linear`);
- `weight_only`: 1-8 bit weight-only layers on the CPU int4 / int8 kernels.

Nothing here imports the methods: a runtime module needs only its tensors.
"""
