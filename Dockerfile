# pynsqd, pynsqlookupd, pynsqadmin and the tools (pynsq_tail, pyto_nsq...) in one image.
#   nsqd:       docker run -p 4150:4150 -p 4151:4151 -v nsqd-data:/data pynsqd [flags...]
#   nsqlookupd: docker run -p 4160:4160 -p 4161:4161 --entrypoint pynsqlookupd pynsqd [flags...]
#   nsqadmin:   docker run -p 4171:4171 --entrypoint pynsqadmin pynsqd --lookupd-http-address=HOST:4161
#   a cluster:  docker compose up (docker-compose.yml)
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# a fixed uid/gid so that volume ownership is predictable across rebuilds
RUN groupadd --system --gid 4150 nsq \
    && useradd --system --uid 4150 --gid nsq --home-dir /data --no-create-home --shell /usr/sbin/nologin nsq

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pynsqd ./pynsqd
COPY pynsqlookupd ./pynsqlookupd
COPY pynsqadmin ./pynsqadmin
COPY client ./client
RUN pip install . \
    && rm -rf /src \
    && mkdir -p /data \
    && chown nsq:nsq /data

WORKDIR /data
VOLUME /data
USER nsq

# nsqd TCP, HTTP, HTTPS; nsqlookupd TCP, HTTP; nsqadmin HTTP (same image, --entrypoint)
EXPOSE 4150 4151 4152 4160 4161 4171

# /ping on the HTTP address the daemon was started with (its flags and --config
# file, read from /proc/1/cmdline), so a moved --http-address is still checked
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "pynsqd.healthcheck"]

ENTRYPOINT ["pynsqd", "--data-path=/data"]
