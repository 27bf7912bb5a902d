# Minimal CPU image: the same pinned install as `make install` (constraints.txt), dsprune as entry point.
# The shipping issue hardens this (CPU-only torch wheel source, multi-stage, GPU variant, hadolint in CI).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY exporters ./exporters
COPY benchmarks ./benchmarks
COPY configs ./configs
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --create-home dsprune
USER dsprune
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ENTRYPOINT ["dsprune"]
CMD ["--help"]
