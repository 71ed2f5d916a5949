# MLflow tracking server with basic auth (mlflow >= 3.10: fixes for the path-traversal CVEs
# CVE-2023-1177, CVE-2024-1560, CVE-2026-2614).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow>=3.10,<4" "psycopg2-binary>=2.9" "psycopg[binary]>=3.1" \
    && useradd --create-home --uid 1000 mlflow
COPY docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint.sh
USER mlflow
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint.sh"]
