# syntax=docker/dockerfile:1
# Slim runtime image: the router package only, run as an unprivileged user.
# Every Python package comes from constraints.txt (the same pins as CI).
# It starts and serves with environment variables only: see config/container.yaml
# (WA_ROUTER_INSTANCES and ROUTER_API_KEY are required).
FROM python:3.11-slim AS build
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY router ./router
RUN pip install --no-cache-dir -c constraints.txt pip setuptools wheel \
 && pip wheel --no-cache-dir --no-build-isolation -c constraints.txt --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin router
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
COPY config/container.yaml /etc/wa-session-router/router.yaml
USER router
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WA_ROUTER_PORT', '8080'), timeout=2)" || exit 1
ENTRYPOINT ["session-router", "run"]
CMD ["-c", "/etc/wa-session-router/router.yaml"]
