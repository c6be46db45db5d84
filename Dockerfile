# haproxy-ln: build the wheel (with the C extension) in one stage, run it in a
# slim one as a non-root user. The health endpoint and HEALTHCHECK arrive
# with the agent; until then the image runs the proxy alone.
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
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /var/lib/haproxy-ln --create-home haproxy-ln \
 && mkdir -p /etc/haproxy-ln \
 && chown haproxy-ln:haproxy-ln /etc/haproxy-ln
USER 10001
VOLUME ["/etc/haproxy-ln"]
EXPOSE 6432
ENTRYPOINT ["haproxy-ln"]
CMD ["proxy", "--config", "/etc/haproxy-ln/haproxy-ln.toml"]
