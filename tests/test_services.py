from __future__ import annotations

import socket

from edge.services import Influxd, Mosquitto


def test_mosquitto_accepts_connections(mosquitto: Mosquitto) -> None:
    with socket.create_connection((mosquitto.host, mosquitto.port), timeout=2):
        pass
    assert mosquitto.running


def test_influxd_roundtrip(influxd: Influxd) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{influxd.url}/write?db={influxd.database}&precision=ns",
        data=b"t,a=b v=1.5 1000000000\n",
        method="POST",
    )
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 204
    series = influxd.query("SELECT v FROM t")
    assert series[0]["values"] == [["1970-01-01T00:00:01Z", 1.5]]
