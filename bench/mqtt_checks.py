"""What the MQTT sink's checks before sending cost, per event, in-process.

Builds the messages of ``-n`` queued events (``file.created`` with a path, as
the file source makes them) the way the sink does, then runs the checks that
keep an event the broker cannot take from wedging the sink (the topic's text,
the payload against ``max_message_bytes``, the packet against the broker's
Maximum Packet Size). Prints microseconds per event for building alone and
for building plus checks, one event per message and batches of 100; the best
of ``--repeat`` runs. No broker: the network is not what is measured.

    .venv/bin/python bench/mqtt_checks.py [-n 20000] [--repeat 5]
"""

from __future__ import annotations

import os
import sys

# This folder holds queue.py, which would shadow the standard library's queue:
# take the folder off sys.path, and put the checkout's root on it.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import time  # noqa: E402

from edge_agent import Event  # noqa: E402
from edge_agent.plugins import mqtt_messages  # noqa: E402
from edge_agent.plugins.mqtt import MqttSink  # noqa: E402
from edge_agent.testing import plugin_config, queued_events  # noqa: E402


def best_time(run, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="events per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is shown")
    args = parser.parse_args()
    events = queued_events(
        [
            Event(type="file.created", source="inbox", data={"path": f"/in/{i}.csv", "size": i})
            for i in range(args.n)
        ]
    )
    print(f"{args.n} events, best of {args.repeat} runs")
    print(f"{'messages':<24} | {'build µs/event':>14} | {'build + checks µs/event':>23}")
    for batch in (1, 100):
        config = plugin_config(MqttSink, {"batch_max_events": batch}, "bench")
        topics = mqtt_messages.TopicCache(config.topic)

        def build(config=config, topics=topics) -> list:
            return mqtt_messages.build_messages(config, events, topics)

        def build_and_check(config=config, topics=topics) -> None:
            for message in mqtt_messages.build_messages(config, events, topics):
                mqtt_messages.message_problem(
                    message, 1, config.max_message_bytes, mqtt_messages.MQTT_MAX_PACKET
                )

        built = best_time(build, args.repeat) / args.n * 1e6
        checked = best_time(build_and_check, args.repeat) / args.n * 1e6
        label = "one event per message" if batch == 1 else f"batches of {batch}"
        print(f"{label:<24} | {built:>14.2f} | {checked:>23.2f}")


if __name__ == "__main__":
    main()
