"""The edge runtime: site config, agent, outbox, backbone client, ingest, InfluxDB writers, CLI."""
