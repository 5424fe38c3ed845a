"""One module per compression method; importing this package registers them all."""

from workers.compression.methods import dynamic_int8, gptq, rtn  # noqa: F401
