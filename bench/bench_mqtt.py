"""Southbound MQTT: our field driver vs a bare paho subscriber on the same broker and messages.

Both subscribers drain the same pre-generated messages (simulated bench telemetry
and OCPP 1.6 / 2.0.1 charger messages) from a persistent session that mosquitto
filled while they were away, so the broker delivers at full speed and the
publisher's speed does not enter the figure.

* bare: paho-mqtt 2.x, ``on_message`` does ``orjson.loads`` and counts.
* ours: ``MqttFieldDriver`` end to end: paho thread -> bounded queue -> validation,
  sequence tracking, pseudonymisation -> SampleBatch.

Usage: .venv/bin/python bench/bench_mqtt.py [--messages 50000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from drivers.base import DriverContext, SeriesKey, SeriesTable
from drivers.mqtt.config import MqttFieldSource
from drivers.mqtt.driver import MqttFieldDriver
from edge.services import Mosquitto
from sim.field import FieldDevice, FieldDeviceSpec

TOPICS = ("field/bench/+/telemetry", "field/charger/+/#")


def generate(n: int) -> tuple[list[tuple[str, bytes]], list[FieldDeviceSpec]]:
    """n messages from 30 benches and 10 chargers (half 1.6, half 2.0.1), round robin."""
    specs = [
        FieldDeviceSpec(kind="bench", id=f"bench-{i:02d}", interval_s=300, seed=i)
        for i in range(30)
    ]
    specs += [
        FieldDeviceSpec(kind="charger", id=f"cp-{i:02d}", interval_s=60, seed=100 + i,
                        ocpp="1.6" if i % 2 else "2.0.1")
        for i in range(10)
    ]  # fmt: skip
    devices = [FieldDevice(s, start_hour=10.0) for s in specs]
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        for dev in devices:
            out += [(m.topic, m.payload) for m in dev.tick()]
    return out[:n], specs


def publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    """Publish QoS 1 and wait for every PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    client.max_inflight_messages_set(1000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    infos = [client.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


def register_session(broker: Mosquitto, client_id: str) -> None:
    """Create a persistent session with the subscriptions, then leave."""
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_subscribe = lambda *_: done.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe([(t, 1) for t in TOPICS])
    done.wait(10)
    client.disconnect()
    client.loop_stop()


def run_bare(broker: Mosquitto, n: int, client_id: str, extract: bool) -> tuple[float, float, int]:
    """(wall s, cpu s, values) for a paho subscriber that parses JSON (and extracts numbers).

    ``extract``: also pull every numeric value into column lists, the least a
    hand-written subscriber does to produce samples (no validation, no seq, no pseudonyms).
    """
    count = 0
    values = 0
    done = threading.Event()
    col_topic: list[str] = []
    col_value: list[float] = []

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal count, values
        data = orjson.loads(msg.payload)
        if extract:
            topic = msg.topic
            if "meterValue" in data:
                got = [float(sv["value"]) for mv in data["meterValue"] for sv in mv["sampledValue"]]
            else:
                got = [float(v) for v in data.values() if type(v) in {int, float, bool}]
            col_value.extend(got)
            col_topic.extend([topic] * len(got))
            values += len(got)
        else:
            values += len(data)
        count += 1
        if count >= n:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.max_inflight_messages_set(1000)
    t0, c0 = time.perf_counter(), time.process_time()
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not done.wait(120):
        raise RuntimeError(f"bare subscriber got {count} of {n}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    client.disconnect()
    client.loop_stop()
    return wall, cpu, values


def driver_for(broker: Mosquitto, specs: list[FieldDeviceSpec], client_id: str) -> MqttFieldDriver:
    cfg = MqttFieldSource.model_validate(
        {
            "type": "mqtt", "area": "street", "device": "street", "queue_size": 100_000,
            "broker": {"host": broker.host, "port": broker.port, "client_id": client_id,
                       "clean_session": False},
            "devices": [{"id": s.id, "kind": s.kind} for s in specs],
        }
    )  # fmt: skip
    table = SeriesTable(
        SeriesKey("tpo", cfg.area, s.device, s.channel, s.unit, "mqtt", s.codes)
        for s in cfg.channel_specs()
    )
    return MqttFieldDriver(cfg, table, DriverContext(site="tpo", secret=b"bench-secret"))


async def run_ours(
    broker: Mosquitto, specs: list[FieldDeviceSpec], rows_expected: int, client_id: str
) -> tuple[float, float, int]:
    """(wall s, cpu s, samples) for our driver draining the queued session."""
    drv = driver_for(broker, specs, client_id)
    rows = 0
    t0, c0 = time.perf_counter(), time.process_time()
    async with drv:
        async with asyncio.timeout(120):
            async for batch in drv.stream():
                rows += len(batch)
                if rows >= rows_expected:
                    break
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bad = {
        k: v for k, v in drv.ctx.counters.items() if k.startswith(("mqtt_invalid", "mqtt_queue"))
    }
    if bad:
        raise RuntimeError(f"driver rejected or dropped messages: {bad}")
    return wall, cpu, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    n = args.messages
    messages, specs = generate(n)
    # Samples the driver must produce: a dry parse of the same messages.
    rows_expected = len(
        driver_for(Mosquitto(Path(), port=1), specs, "dry").parse([(t, p, 0) for t, p in messages])
    )
    mean_bytes = sum(len(p) for _, p in messages) / n
    print(f"python {platform.python_version()}, paho-mqtt {version('paho-mqtt')}, mosquitto 2.0")
    print(
        f"{n:,} messages ({mean_bytes:.0f} B mean; 30 benches, 10 chargers), "
        f"{rows_expected:,} samples"
    )
    results: dict[str, list[tuple[float, float, int]]] = {"bare": [], "extract": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto").start()
        try:
            for r in range(args.rounds):
                order = ["bare", "extract", "ours"]
                for name in order[::-1] if r % 2 else order:
                    cid = f"bench-{name}-{r}"
                    register_session(broker, cid)
                    publish_all(broker, messages)
                    if name != "ours":
                        results[name].append(run_bare(broker, n, cid, extract=name == "extract"))
                    else:
                        results[name].append(
                            asyncio.run(run_ours(broker, specs, rows_expected, cid))
                        )
        finally:
            broker.stop()
    print()
    print(
        "| subscriber                              |     msgs/s |  samples/s "
        "| msgs/CPU-s | vs bare |"
    )
    print(
        "|-----------------------------------------|------------|------------|------------|---------|"
    )
    best = {k: min(v, key=lambda x: x[0]) for k, v in results.items()}
    bare_rate = n / best["bare"][0]
    labels = (
        ("bare", "bare paho + orjson.loads"),
        ("extract", "bare paho + orjson + numbers to lists"),
        ("ours", "MqttFieldDriver -> SampleBatch"),
    )
    for name, label in labels:
        wall, cpu, values = best[name]
        samples = f"{rows_expected / wall:10,.0f}" if name == "ours" else f"{values / wall:10,.0f}"
        print(
            f"| {label:39} | {n / wall:10,.0f} | {samples} | {n / cpu:10,.0f} "
            f"| {n / wall / bare_rate:6.2f}x |"
        )
    print()
    ours = n / best["ours"][0]
    print(
        f"ratio ours/bare parse (msgs/s, best of {args.rounds}): {ours / bare_rate:.2f} "
        "(target >= 0.80)"
    )
    print(f"ratio ours/bare parse+extract: {ours / (n / best['extract'][0]):.2f}")


if __name__ == "__main__":
    main()
