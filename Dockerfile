# regflow: CPU image by default. For CUDA: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    DVC_NO_ANALYTICS=1

# tini as PID 1: reaps orphans and passes signals on, so that `docker stop` and a killed
# `regflow serve` end the whole server (its workers also watch their parent)
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.* tini=0.19.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 regflow

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --extra-index-url "${TORCH_INDEX}" -r requirements.lock
COPY regflow ./regflow
RUN pip install --no-deps .
COPY params.yaml dvc.yaml ./

USER 1000:1000
ENTRYPOINT ["tini", "-g", "--", "regflow"]
CMD ["--help"]
