# syntax=docker/dockerfile:1.7
# The serving image: `knd serve` on Cloud Run. Only the serving runtime (the project's base
# dependencies: ONNX Runtime, FastAPI, no torch) plus gcsfs, pinned by the lock, for the
# gs:// prediction log. Multi-stage: the final image has no uv, no build cache, a non-root
# user, and listens on $PORT (Cloud Run sets it; 8080 otherwise). Build from the root:
#   docker build -f docker/serve.Dockerfile -t IMAGE .
ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-default-groups --no-editable \
    && uv export --frozen --no-dev --extra cloud --no-emit-project --no-hashes \
        --output-file /tmp/pins.txt \
    && uv pip install --python /opt/venv/bin/python --constraint /tmp/pins.txt gcsfs

FROM python:${PYTHON_VERSION}-slim-bookworm
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin knd
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PORT=8080 \
    KND_MODEL=/models/latest
USER 10001
WORKDIR /home/knd
EXPOSE 8080
# A shell so $PORT, $KND_MODEL and $KND_LOG_SINK (set by `knd cloud deploy`) expand; exec so
# uvicorn gets the signals. KND_MODEL and KND_LOG_SINK are this image's variables, not config
# keys: this CMD passes them as --model and --set serve.log_sink. PORT (from Cloud Run) and
# the variables deploy sets for config keys (KND_ALLOW_NO_TOKEN, KND_MIN_CONFIDENCE, the
# timeouts: config.ENV_KEYS), like KND_API_TOKEN, are read by knd itself.
CMD ["sh", "-c", "exec knd serve --model \"$KND_MODEL\" --host 0.0.0.0 --port \"$PORT\" ${KND_LOG_SINK:+--set \"serve.log_sink=$KND_LOG_SINK\"}"]
