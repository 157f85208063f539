# potluck's image: one image for agents, the server and `init-model`, CPU-only torch.
#
#   docker build -t potluck:0.1.0 .
#   docker run --rm potluck:0.1.0 --help               # the entrypoint is `potluck`
#   docker compose -f deploy/compose.yaml up           # two agents and the server, see there
FROM python:3.11-slim

# The Makefile's pin, from PyTorch's CPU-only index: PyPI's x86_64 torch is a CUDA build of
# several GB. torch goes in first, so the project's `torch>=2.4` is already met and pip fetches
# no other build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Only what the package needs (see [tool.setuptools] in pyproject.toml); tests, docs and the
# deploy files stay out of the image. Built from a copy in /tmp, removed in the same layer.
COPY pyproject.toml /tmp/potluck/
COPY server /tmp/potluck/server
COPY scheduler /tmp/potluck/scheduler
COPY node_agent /tmp/potluck/node_agent
COPY protos /tmp/potluck/protos
RUN pip install /tmp/potluck && rm -rf /tmp/potluck && potluck --help >/dev/null

# A fixed non-root uid, so Kubernetes' runAsNonRoot can check it and a bind-mounted model folder
# can be given to it (chown 10001). /models belongs to it: a named volume mounted there starts
# with this ownership, so `potluck init-model` may write into it.
RUN groupadd --system --gid 10001 potluck \
 && useradd --system --uid 10001 --gid potluck --home-dir /home/potluck --create-home \
      --shell /usr/sbin/nologin potluck \
 && install -d -o potluck -g potluck /models
USER 10001:10001
WORKDIR /home/potluck

# 8000: the HTTP API (`serve`); 50051: an agent's gRPC port; 50052: its decode data plane (with
# --data-port 50052).
EXPOSE 8000 50051 50052
ENTRYPOINT ["potluck"]
CMD ["--help"]
