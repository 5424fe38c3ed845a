"""The command line: the composition root (it may import app and workers; nothing imports it)."""
