#!/bin/bash
# InfluxDB 2.7 init script (runs once, after DOCKER_INFLUXDB_INIT_MODE=setup created the org,
# the bucket and the admin token; the influx CLI is already configured with that token).
# The dashboards speak InfluxQL, so the bucket needs a v1 database/retention-policy mapping,
# and Grafana a read-only v1 user. Values come from the environment (docker-compose.yml,
# from .env); nothing secret is echoed.
set -euo pipefail

: "${DOCKER_INFLUXDB_INIT_BUCKET_ID:?}" "${DOCKER_INFLUXDB_INIT_ORG:?}"
: "${INFLUX_DB:?}" "${INFLUX_READ_USER:?}" "${INFLUX_READ_PASSWORD:?}"

influx v1 dbrp create \
  --org "${DOCKER_INFLUXDB_INIT_ORG}" \
  --bucket-id "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" \
  --db "${INFLUX_DB}" \
  --rp autogen \
  --default

influx v1 auth create \
  --org "${DOCKER_INFLUXDB_INIT_ORG}" \
  --username "${INFLUX_READ_USER}" \
  --password "${INFLUX_READ_PASSWORD}" \
  --read-bucket "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" \
  --description "grafana (InfluxQL, read-only)" >/dev/null

echo "tpo-edge: v1 mapping ${INFLUX_DB}/autogen and read-only user ${INFLUX_READ_USER} created"
