# The MLflow tracking server of docker/compose.yaml: PostgreSQL backend, served artifacts,
# basic auth. mlflow >= 3.10 (fixes for the path-traversal CVEs CVE-2023-1177,
# CVE-2024-1560, CVE-2026-2614); the `auth` extra brings the basic-auth app.
#   docker build -f docker/mlflow.Dockerfile -t hpo-mlflow .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install "mlflow[auth]>=3.10,<4" "psycopg[binary]>=3.1" \
    && useradd --create-home --uid 10001 mlflow \
    && mkdir -p /mlartifacts && chown mlflow:mlflow /mlartifacts
COPY docker/check-secrets.sh docker/mlflow-entrypoint.sh docker/mlflow-users.py /usr/local/bin/
USER mlflow
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint.sh"]
