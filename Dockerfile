# haproxy-ln: the wheel (with its C extension) is built in one stage and
# installed into a slim one that runs the agent as a non-root user.
#
#   docker build -t haproxy-ln .
#   docker run --network host \
#       -v /etc/haproxy-ln:/etc/haproxy-ln:ro -v haproxy-ln-state:/var/lib/haproxy-ln \
#       --tmpfs /run/haproxy-ln:mode=0755,uid=10001,gid=10001 haproxy-ln
#
# /run/haproxy-ln (the keys, [keys] runtime_dir = /run/haproxy-ln/keys) must
# be a tmpfs, so it is not a VOLUME: a volume is on disk. There is no
# systemd in the container: [daemon] mode = "command" cannot use systemctl
# here, and the unit's watchdog and BindsTo= do not exist (docs/deploy.md).
FROM python:3.11-slim-bookworm AS build
# The toolchain follows Debian's security updates; pinning would only break it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libffi-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY native ./native
COPY haproxy_ln ./haproxy_ln
# Wheels of haproxy-ln and of every dependency, so the runtime stage needs no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# pg_dump (PostgreSQL 15) makes the initial copy of a new or rejoining standby.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
 && rm -rf /wheels \
 && groupadd --system --gid 10001 haproxy-ln \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/haproxy-ln \
        --create-home --shell /usr/sbin/nologin haproxy-ln \
 && chmod 0750 /var/lib/haproxy-ln \
 && install -d -o root -g haproxy-ln -m 0750 /etc/haproxy-ln \
 && install -d -o haproxy-ln -g haproxy-ln -m 0755 /run/haproxy-ln
USER 10001
# The configuration (read-only: the TOML file, sealed keys, certificates) and
# the agent's state (the safety event log, [node] event_log).
VOLUME ["/etc/haproxy-ln", "/var/lib/haproxy-ln"]
# The proxy (the daemon's database URL points here) and the health server.
EXPOSE 6432 8008
# /health answers 200 while the agent's HA loop steps, 503 otherwise
# ([health] listen must include 127.0.0.1, e.g. the default 0.0.0.0:8008).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8008/health', timeout=2)"]
ENTRYPOINT ["haproxy-ln"]
CMD ["run", "--config", "/etc/haproxy-ln/haproxy-ln.toml"]
