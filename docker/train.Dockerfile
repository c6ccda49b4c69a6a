# syntax=docker/dockerfile:1.7
# The training image: `knd train` on Vertex AI. torch comes from the lock (PyPI's Linux
# wheels carry their CUDA libraries; the host provides only the driver), so a slim Python
# base is enough. Build from the repository root:
#   docker build -f docker/train.Dockerfile -t IMAGE .
ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM python:${PYTHON_VERSION}-slim-bookworm
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app

# Dependencies first (cached while only the source changes): every extra, no dev tools.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-dev --extra all --no-install-project --no-editable

COPY pyproject.toml uv.lock README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra all --no-editable

# Config files travel as `knd cloud submit --config configs/...`: paths inside this image.
COPY configs ./configs

ENTRYPOINT ["knd"]
CMD ["--help"]
