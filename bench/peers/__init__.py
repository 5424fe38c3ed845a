"""Helpers of `bench/quant_peers.py`: `worker` runs one row in a fresh process, `compressors` says
how each library compresses and saves. Both import in the project's venv and in the peers' venv."""
