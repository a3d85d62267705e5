# st-credential-proxy container image.
#
#   docker build -t st-credential-proxy:0.1.0 .
#
# Two stages: "build" turns the source into a wheel and installs it with its dependencies into a virtual environment
# (deploy/docker/install.sh, the same script tests/test_deploy.py runs); "runtime" gets only that environment. The
# runtime image has no compiler, no pip and no source tree, runs as a numeric non-root user, and writes nothing at run
# time, so it works with a read-only root filesystem.

FROM python:3.12.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY st_proxy/ st_proxy/
COPY deploy/docker/install.sh /usr/local/bin/st-proxy-install
RUN sh /usr/local/bin/st-proxy-install /src /opt/st-proxy /tmp/wheels

FROM python:3.12.12-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="st-credential-proxy" \
      org.opencontainers.image.description="Credential-injecting reverse proxy for the ServiceTitan API" \
      org.opencontainers.image.licenses="Apache-2.0"
# PYTHONDONTWRITEBYTECODE: the .pyc files were compiled at install time; never try to write more into a read-only root.
ENV PATH=/opt/st-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 st-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin st-proxy
COPY --from=build /opt/st-proxy /opt/st-proxy
COPY deploy/docker/config.yaml /etc/st-proxy/config.yaml
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 8080: the data port (callers); 9090: the admin port (/metrics /healthz /readyz /tenants).
EXPOSE 8080 9090
# SIGTERM starts the graceful drain (shutdown.drain_seconds, then up to shutdown.timeout_seconds for requests in
# flight): give the container at least their sum plus a few seconds (docker stop -t, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["st-proxy"]
CMD ["serve", "--config", "/etc/st-proxy/config.yaml"]
