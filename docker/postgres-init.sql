-- The compose PostgreSQL holds three databases: optuna (POSTGRES_DB), mlflow, mlflow_auth.
CREATE DATABASE mlflow OWNER hpo;
CREATE DATABASE mlflow_auth OWNER hpo;
