#!/bin/sh
# Creates the login roles and databases of docker/compose.yaml, none of them a superuser:
#   role optuna            owns database optuna                (the Optuna study storage)
#   role optuna_dashboard  reads database optuna, writes nothing (optuna-dashboard, which has
#                          no login: its API could delete studies or tell trials)
#   role mlflow            owns databases mlflow, mlflow_auth  (MLflow runs/registry, MLflow users)
# Each database is closed to PUBLIC, so a role connects only to its own. The superuser
# (POSTGRES_PASSWORD) stays with the postgres service; no other service is given it.
#
# The postgres image runs it once, on an empty data folder (/docker-entrypoint-initdb.d).
# Passwords come from the environment into psql with \getenv: never on a command line.
# Outside docker (the tests): PGHOST=127.0.0.1 PGUSER=postgres sh docker/postgres-init.sh,
# with OPTUNA_DB_USER/OPTUNA_DB_NAME/OPTUNA_DASHBOARD_DB_USER/MLFLOW_DB_USER/MLFLOW_DB_NAME/
# MLFLOW_AUTH_DB_NAME to rename.
set -eu
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD (docker/.env)}"
: "${OPTUNA_DASHBOARD_DB_PASSWORD:?set OPTUNA_DASHBOARD_DB_PASSWORD (docker/.env)}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD (docker/.env)}"
export OPTUNA_DB_USER="${OPTUNA_DB_USER:-optuna}" OPTUNA_DB_NAME="${OPTUNA_DB_NAME:-optuna}"
export OPTUNA_DASHBOARD_DB_USER="${OPTUNA_DASHBOARD_DB_USER:-optuna_dashboard}"
export MLFLOW_DB_USER="${MLFLOW_DB_USER:-mlflow}" MLFLOW_DB_NAME="${MLFLOW_DB_NAME:-mlflow}"
export MLFLOW_AUTH_DB_NAME="${MLFLOW_AUTH_DB_NAME:-mlflow_auth}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
    --username "${POSTGRES_USER:-${PGUSER:-postgres}}" --dbname "${POSTGRES_DB:-${PGDATABASE:-postgres}}" <<'SQL'
\getenv optuna_user OPTUNA_DB_USER
\getenv optuna_db OPTUNA_DB_NAME
\getenv optuna_password OPTUNA_DB_PASSWORD
\getenv reader_user OPTUNA_DASHBOARD_DB_USER
\getenv reader_password OPTUNA_DASHBOARD_DB_PASSWORD
\getenv mlflow_user MLFLOW_DB_USER
\getenv mlflow_db MLFLOW_DB_NAME
\getenv mlflow_auth_db MLFLOW_AUTH_DB_NAME
\getenv mlflow_password MLFLOW_DB_PASSWORD
SET password_encryption = 'scram-sha-256';
CREATE ROLE :"optuna_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'optuna_password';
CREATE ROLE :"mlflow_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'mlflow_password';
CREATE DATABASE :"optuna_db" OWNER :"optuna_user";
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_user";
CREATE DATABASE :"mlflow_auth_db" OWNER :"mlflow_user";
REVOKE ALL ON DATABASE :"optuna_db" FROM PUBLIC;
REVOKE ALL ON DATABASE :"mlflow_db" FROM PUBLIC;
REVOKE ALL ON DATABASE :"mlflow_auth_db" FROM PUBLIC;
-- the dashboard's role: connects to the study database and reads the tables the optuna
-- role makes (now and later, default privileges); it may not write, create or delete
CREATE ROLE :"reader_user" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'reader_password';
GRANT CONNECT ON DATABASE :"optuna_db" TO :"reader_user";
\connect :"optuna_db"
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"optuna_user";
GRANT USAGE ON SCHEMA public TO :"reader_user";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"reader_user";
ALTER DEFAULT PRIVILEGES FOR ROLE :"optuna_user" IN SCHEMA public GRANT SELECT ON TABLES TO :"reader_user";
ALTER DEFAULT PRIVILEGES FOR ROLE :"optuna_user" IN SCHEMA public GRANT SELECT ON SEQUENCES TO :"reader_user";
SQL
echo "postgres-init: roles $OPTUNA_DB_USER, $OPTUNA_DASHBOARD_DB_USER (reads $OPTUNA_DB_NAME only), $MLFLOW_DB_USER (no superuser) and databases $OPTUNA_DB_NAME, $MLFLOW_DB_NAME, $MLFLOW_AUTH_DB_NAME ready"
