# The one image of corpusfactory's services in docker-compose.yml (the command picks the
# component: `produce`, `worker --role scorer`, `serve`, ...). Kafka and Milvus are
# separate services there, so no Java and no embedded broker here.

# Build stage: llama-cpp-python compiles llama.cpp from source (C/C++ toolchain).
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pinned dependencies first: this layer stays cached while the code changes.
COPY requirements.lock .
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY corpusfactory corpusfactory
COPY streams streams
COPY producers producers
COPY consumers consumers
COPY training training
COPY serving serving
RUN pip install --no-cache-dir --no-deps .

# Runtime stage: the environment without the toolchain (libgomp: llama.cpp's OpenMP).
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CORPUSFACTORY_STATE_DIR=/data
WORKDIR /app
# Settings profiles, for CORPUSFACTORY_CONFIG=/app/configs/<name>.yaml.
COPY configs configs
VOLUME /data
ENTRYPOINT ["corpusfactory"]
CMD ["--help"]
