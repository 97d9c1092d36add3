#!/bin/bash
# Runs once, on the first start of an empty data volume (postgres image's initdb hook):
# one role and database for Prefect, one role with two databases (tracking, auth) for MLflow.
# The names can be changed through the environment (tests/stack makes fresh ones per run).
set -euo pipefail
: "${PREFECT_DB_PASSWORD:?set it}" "${MLFLOW_DB_PASSWORD:?set it}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v prefect_pw="$PREFECT_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" \
    -v prefect_user="${PREFECT_DB_USER:-prefect}" -v prefect_db="${PREFECT_DB_NAME:-prefect}" \
    -v mlflow_user="${MLFLOW_DB_USER:-mlflow}" -v mlflow_db="${MLFLOW_DB_NAME:-mlflow}" \
    -v mlflow_auth_db="${MLFLOW_AUTH_DB_NAME:-mlflow_auth}" <<'SQL'
CREATE ROLE :"prefect_user" LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE :"prefect_db" OWNER :"prefect_user";
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_user";
CREATE DATABASE :"mlflow_auth_db" OWNER :"mlflow_user";
SQL
