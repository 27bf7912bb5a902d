# dsprune on CPU: the pinned install, the bundled all-MiniLM-L6-v2, no network at run time.
#
#   docker build -t dsprune:cpu .
#   docker run --rm -v "$PWD/../shared/data:/shared/data:ro" -v "$PWD/runs:/app/runs" \
#       dsprune:cpu run -c configs/sst2-minilm.yaml
#
# The install is scripts/install.sh, the same command `make install` and .ci/run use, against the
# same constraints.txt; torch comes from the CPU wheel index, so no CUDA libraries enter the image.
# Python 3.11: the interpreter constraints.txt was locked with. The GPU image is Dockerfile.gpu.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY scripts/install.sh scripts/
COPY pipeline pipeline
COPY exporters exporters
COPY benchmarks benchmarks
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN scripts/install.sh --torch-index "${TORCH_INDEX}" --no-editable /opt/venv

# The final stage gets the virtual environment alone: no sources, no pip cache, no build tools.
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --gid 10001 dsprune \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin dsprune
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY configs configs
# Relative data paths in configs/ (../shared/data/glue/...) resolve to /shared/data: mount it there.
RUN install -d -o 10001 -g 10001 /app/runs
USER 10001:10001
ENTRYPOINT ["dsprune"]
CMD ["--help"]
