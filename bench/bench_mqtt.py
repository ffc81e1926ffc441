"""Southbound MQTT: our field driver vs bare paho subscribers on the same broker and messages.

Every subscriber drains the same pre-generated messages (simulated bench telemetry
and OCPP 1.6 / 2.0.1 charger messages) from a persistent session that mosquitto
filled while it was away, so the broker delivers at full speed and the
publisher's speed does not enter the figure. Rounds are interleaved (the order
flips every round) and the table shows medians over the rounds.

* bare thread, parse: paho-mqtt 2.x with its network thread (``loop_start``);
  ``on_message`` does ``orjson.loads`` and counts. A floor, not a fair peer.
* bare thread, extract: the same, and every numeric value goes into column
  lists with its topic (OCPP 1.6 strings converted): what a hand-written
  subscriber needs at least to produce samples.
* bare loop, extract: the same extraction, with paho driven by the asyncio event
  loop (add_reader/add_writer, no network thread), the I/O our driver uses. This
  is the fair peer: the difference to ours is exactly the driver's work.
* ours: ``MqttFieldDriver`` end to end: paho on the event loop -> bounded inbox ->
  validation, timestamps, sequence tracking, pseudonymisation -> SampleBatch.

Usage: .venv/bin/python bench/bench_mqtt.py [--messages 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

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


_NUMERIC = frozenset({int, float, bool})


class Extractor:
    """Bare ``on_message``: parse, then every numeric value with its topic into column lists."""

    def __init__(self, n: int, extract: bool) -> None:
        self.n = n
        self.extract = extract
        self.count = 0
        self.values = 0
        self.col_topic: list[str] = []
        self.col_value: list[float] = []
        self.done = threading.Event()

    def on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        data = orjson.loads(msg.payload)
        if self.extract:
            got = [float(v) for v in data.values() if type(v) in _NUMERIC]
            meter_values = data.get("meterValue")
            if meter_values:  # OCPP sampled values: 1.6 strings, 2.0.1 numbers
                got += [float(sv["value"]) for mv in meter_values for sv in mv["sampledValue"]]
            self.col_value += got
            self.col_topic += [msg.topic] * len(got)
            self.values += len(got)
        else:
            self.values += len(data)
        self.count += 1
        if self.count >= self.n:
            self.done.set()


def _client(client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.max_inflight_messages_set(1000)
    return client


def run_bare(broker: Mosquitto, n: int, client_id: str, extract: bool) -> tuple[float, float, int]:
    """(wall s, cpu s, values) for a paho subscriber with its own network thread."""
    sub = Extractor(n, extract)
    client = _client(client_id)
    client.on_message = sub.on_message
    t0, c0 = time.perf_counter(), time.process_time()
    client.connect(broker.host, broker.port)
    client.loop_start()
    if not sub.done.wait(120):
        raise RuntimeError(f"bare subscriber got {sub.count} of {n}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    client.disconnect()
    client.loop_stop()
    return wall, cpu, sub.values


async def run_bare_loop(broker: Mosquitto, n: int, client_id: str) -> tuple[float, float, int]:
    """(wall s, cpu s, values) for a paho subscriber driven by the asyncio loop, as ours is."""
    loop = asyncio.get_running_loop()
    sub = Extractor(n, extract=True)
    finished = asyncio.Event()
    client = _client(client_id)
    client.on_message = sub.on_message

    def readable() -> None:
        for _ in range(1024):  # read what is there, like the driver's burst
            before = sub.count
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or sub.count == before:
                break
        if sub.done.is_set():
            finished.set()

    def opened(_c: mqtt.Client, _u: object, sock: Any) -> None:
        loop.add_reader(sock, readable)

    def closed(_c: mqtt.Client, _u: object, sock: Any) -> None:
        loop.remove_reader(sock)

    def want_write(c: mqtt.Client, _u: object, sock: Any) -> None:
        loop.add_writer(sock, c.loop_write)

    def wrote(_c: mqtt.Client, _u: object, sock: Any) -> None:
        loop.remove_writer(sock)

    client.on_socket_open = opened
    client.on_socket_close = closed
    client.on_socket_register_write = want_write
    client.on_socket_unregister_write = wrote
    t0, c0 = time.perf_counter(), time.process_time()
    client.connect(broker.host, broker.port)
    async with asyncio.timeout(120):
        await finished.wait()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    client.disconnect()
    client.loop_write()
    return wall, cpu, sub.values


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


LABELS = {
    "parse": "bare paho thread + orjson.loads",
    "thread": "bare paho thread + orjson + extract",
    "loop": "bare paho on asyncio + orjson + extract",
    "ours": "MqttFieldDriver -> SampleBatch",
}


def run_one(
    name: str,
    broker: Mosquitto,
    messages: list[tuple[str, bytes]],
    specs: list[FieldDeviceSpec],
    rows: int,
    cid: str,
) -> tuple[float, float, int]:
    """One subscriber draining one freshly filled session."""
    n = len(messages)
    register_session(broker, cid)
    publish_all(broker, messages)
    if name == "parse":
        return run_bare(broker, n, cid, extract=False)
    if name == "thread":
        return run_bare(broker, n, cid, extract=True)
    if name == "loop":
        return asyncio.run(run_bare_loop(broker, n, cid))
    return asyncio.run(run_ours(broker, specs, rows, cid))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=5)
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
        f"{rows_expected:,} samples; {args.rounds} interleaved rounds, medians"
    )
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in LABELS}
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto").start()
        try:
            for r in range(args.rounds):
                order = list(LABELS)
                for name in order[::-1] if r % 2 else order:
                    cid = f"bench-{name}-{r}"
                    results[name].append(run_one(name, broker, messages, specs, rows_expected, cid))
        finally:
            broker.stop()
    rate = {k: [n / wall for wall, _, _ in v] for k, v in results.items()}
    print()
    print(
        "| subscriber                              |     msgs/s |  values/s | CPU us/msg "
        "| vs fair |"
    )
    print(
        "|-----------------------------------------|------------|-----------|------------|---------|"
    )
    fair = statistics.median(rate["loop"])
    for name, label in LABELS.items():
        runs = results[name]
        msgs = statistics.median(rate[name])
        values = statistics.median(
            (rows_expected if name == "ours" else v) / wall for wall, _, v in runs
        )
        cpu_us = statistics.median(cpu / n * 1e6 for _, cpu, _ in runs)
        print(
            f"| {label:39} | {msgs:10,.0f} | {values:9,.0f} | {cpu_us:10.1f} "
            f"| {msgs / fair:6.2f}x |"
        )
    print()

    def ratio(peer: str) -> str:
        per_round = [o / b for o, b in zip(rate["ours"], rate[peer], strict=True)]
        spread = f"rounds {min(per_round):.2f}-{max(per_round):.2f}"
        return f"{statistics.median(per_round):.2f} ({spread})"

    print(f"ours / bare loop + extract (fair peer): {ratio('loop')}  target >= 0.80")
    cpu = {k: statistics.median(c for _, c, _ in v) for k, v in results.items()}
    print(
        f"CPU per message, ours / fair peer:      {cpu['ours'] / cpu['loop']:.2f}  target <= 1.25"
    )
    print(f"ours / bare thread + extract:           {ratio('thread')}")
    print(f"ours / bare thread, parse only:         {ratio('parse')}")


if __name__ == "__main__":
    main()
