"""One module per compression method; importing this package registers them all."""

from workers.compression.methods import (
    awq,  # noqa: F401
    distill,  # noqa: F401
    dynamic_int8,  # noqa: F401
    fp8,  # noqa: F401
    gptq,  # noqa: F401
    magnitude,  # noqa: F401
    rtn,  # noqa: F401
    smoothquant,  # noqa: F401
    sparsegpt,  # noqa: F401
    structured,  # noqa: F401
    w8a8,  # noqa: F401
    wanda,  # noqa: F401
)
