#!/bin/sh
# The MLflow tracking server of docker/compose.yaml: a SQL backend, served artifacts, and
# basic auth (the `mlflow[auth]` extra). Every setting and secret comes from the
# environment, never from this command line:
#   MLFLOW_BACKEND_STORE_URI        runs and the model registry (postgresql://mlflow:...@postgres/mlflow)
#   MLFLOW_AUTH_DB_URI              users and permissions (postgresql://mlflow:...@postgres/mlflow_auth)
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin user's password (created on the first start)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  a fixed key: CSRF tokens then hold across workers and restarts
#   MLFLOW_HPO_PASSWORD             optional: the non-admin user `hpo` (MLFLOW_HPO_USERNAME) that
#                                   drivers log as; created, or its password reset, on each start
#                                   by mlflow-users.py, through the REST API, as the admin
#   MLFLOW_ARTIFACTS_DESTINATION    the artifact folder (a volume), /mlartifacts by default
#   MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_ALLOWED_HOSTS, MLFLOW_AUTH_CACHE_TTL_SECONDS
#                                   (60: a checked password is trusted for 60 s per worker)
# It refuses the example env file's `change-me` values (check-secrets.sh) and never prints a
# secret. The tests run it outside docker on a temporary database and folder.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
HPO_SERVICE="${HPO_SERVICE:-mlflow}" \
HPO_REQUIRED_SECRETS="MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DB_URI MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY" \
    "$here/check-secrets.sh"

port="${MLFLOW_PORT:-5000}"
export MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}"
# MLflow's job runner serves GenAI jobs that sweeps never send; off, it starts no huey consumers
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# model versions may only point at this server's own artifacts
export MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX="${MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX:-^mlflow-artifacts:/.*\$}"

umask 077
config_dir="$(mktemp -d)"
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"
"$python" - <<'PY'
"""The auth config, 0600: the auth database URL holds a password."""
import configparser
import os

config = configparser.ConfigParser()
config["mlflow"] = {  # % doubled: MLflow reads the file with interpolation
    key: value.replace("%", "%%") for key, value in {
        "default_permission": os.environ.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ"),
        "database_uri": os.environ["MLFLOW_AUTH_DB_URI"],
        "admin_username": os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        # a password check is a slow hash (PBKDF2), and a sweep sends many requests a second
        "auth_cache_ttl_seconds": os.environ.get("MLFLOW_AUTH_CACHE_TTL_SECONDS", "60"),
    }.items()
}
with open(os.environ["MLFLOW_AUTH_CONFIG_PATH"], "w") as handle:
    config.write(handle)
PY

# the `hpo` user, through the REST API once the server answers (in the background)
if [ -n "${MLFLOW_HPO_PASSWORD:-}" ]; then
    MLFLOW_PORT="$port" "$python" "$here/mlflow-users.py" &
fi

exec "$python" -m mlflow server \
    --app-name basic-auth \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" --port "$port" \
    --workers "${MLFLOW_WORKERS:-2}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:$port,localhost,localhost:$port,127.0.0.1,127.0.0.1:$port}"
