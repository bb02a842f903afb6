"""The http source: posts -> queue -> MQTT sink -> a subscriber; events/s and latency.

The real agent (``edge-agent run``, a child process) takes events with the
``http`` source and forwards them to a Mosquitto of this script's own (free
port) at QoS 1, in MQTT batches of 100. Poster threads (keep-alive
connections, ``http.client``) post JSON arrays of ``--batch`` events at a
steady rate of posts per second for ``--seconds``; each event carries the time
it was posted. Measured: events answered 200 per second (each answer means
committed), the post round trip (= commit latency) p50/p99, and from post to
arrival at a QoS 1 subscriber, p50/p99. A rate the agent cannot keep up with
shows as an achieved rate below the offered one: the posters wait for their
answers (they never have more than ``--posters`` posts in flight).

    .venv/bin/python bench/http_source.py [--rates 10,100,1000] [--batch 100] [--seconds 5]
"""

from __future__ import annotations

import os
import sys

# This folder holds queue.py, which would shadow the standard library's queue:
# take the folder off sys.path, and put the checkout's root on it for bench.common.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from bench.common import (  # noqa: E402
    AgentProcess,
    Arrivals,
    Row,
    add_output_arguments,
    agent_toml,
    machine,
    peak_rss_mib,
    percentile,
    plugin_table,
    print_machine,
    sink_toml,
    start_broker,
    status_topic,
    workdir,
    write_results,
)
from edge_agent.testing import free_port  # noqa: E402


def post_at_rate(port: int, rate: float, batch: int, seconds: float, posters: int) -> dict:
    """Post ``rate`` arrays of ``batch`` events a second for ``seconds``; answers and times."""
    round_trips: list[float] = []
    accepted = [0]
    failed = [0]
    lock = threading.Lock()
    start = time.perf_counter() + 0.2
    total = int(rate * seconds)
    next_post = [0]

    def poster() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                n = next_post[0]
                next_post[0] += 1
            if n >= total:
                break
            wait = start + n / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # ok: the posting schedule
            sent = time.time()
            body = json.dumps([{"t": sent, "n": n, "i": i} for i in range(batch)]).encode()
            began = time.perf_counter()
            try:
                conn.request("POST", "/events", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                status = 0
            took = time.perf_counter() - began
            with lock:
                if status == 200:
                    accepted[0] += batch
                    round_trips.append(took)
                else:
                    failed[0] += 1
        conn.close()

    threads = [threading.Thread(target=poster, daemon=True) for _ in range(posters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    round_trips.sort()
    return {
        "offered": rate * batch,
        "accepted": accepted[0],
        "failed_posts": failed[0],
        "events_per_s": accepted[0] / elapsed,
        "posts_per_s": len(round_trips) / elapsed,
        "post_p50_ms": percentile(round_trips, 0.5) * 1000,
        "post_p99_ms": percentile(round_trips, 0.99) * 1000,
    }


def end_to_end(arrivals: Arrivals) -> tuple[float, float]:
    """p50 and p99 (ms) from an event's post to its arrival at the subscriber."""
    delays = []
    for arrived, payload in arrivals.received:
        for event in json.loads(payload):
            delays.append(arrived - event["data"]["t"])
    delays.sort()
    return percentile(delays, 0.5) * 1000, percentile(delays, 0.99) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10,100,1000", help="posts per second, each in turn")
    parser.add_argument("--batch", type=int, default=100, help="events per post")
    parser.add_argument("--seconds", type=float, default=5.0, help="posting time per rate")
    parser.add_argument("--posters", type=int, default=8, help="client threads (connections)")
    add_output_arguments(parser)
    args = parser.parse_args()
    info = machine()
    rows = []
    with workdir("http-source", args.dir, args.keep) as folder:
        print_machine(info, folder)
        print(
            f"workload:  JSON arrays of {args.batch} events posted by {args.posters} keep-alive"
            f" connections for {args.seconds:g}s per rate; agent: http source -> queue ->"
            " mqtt sink (QoS 1, MQTT 5, batches of 100) -> a local Mosquitto"
        )
        broker = start_broker(folder)
        try:
            print(
                f"\n{'posts/s':>8} | {'offered ev/s':>12} | {'accepted ev/s':>13} |"
                f" {'post p50':>8} | {'post p99':>8} | {'e2e p50':>8} | {'e2e p99':>8} | failed"
            )
            print("-" * 96)
            for rate in [float(r) for r in args.rates.split(",")]:
                agent_id = f"http-{rate:g}"
                port = free_port()
                state = os.path.join(folder, agent_id)
                os.makedirs(state)
                tables = plugin_table(
                    "sources.http", name="apps", port=port, threads=8
                ) + sink_toml(broker.port, agent_id, batch_max_events=100)
                agent = AgentProcess(state, agent_toml(agent_id, os.path.join(state, "s"), tables))
                with Arrivals(
                    broker.port,
                    f"edge/{agent_id}/#",
                    status=status_topic(agent_id),
                    keep_payloads=True,
                ) as arrivals:
                    agent.start()
                    try:
                        agent.wait_ready()
                        arrivals.wait_online(agent)
                        result = post_at_rate(port, rate, args.batch, args.seconds, args.posters)
                        arrivals.expect(result["accepted"])
                        arrivals.wait(120, agent)
                        p50, p99 = end_to_end(arrivals)
                        rss = peak_rss_mib(agent.pid)
                    finally:
                        agent.stop()
                print(
                    f"{rate:>8,.0f} | {result['offered']:>12,.0f} |"
                    f" {result['events_per_s']:>13,.0f} | {result['post_p50_ms']:>6.1f}ms |"
                    f" {result['post_p99_ms']:>6.1f}ms | {p50:>6.1f}ms | {p99:>6.1f}ms |"
                    f" {result['failed_posts']}  (agent peak RSS {rss:.0f} MiB)"
                )
                rows.append(
                    Row(
                        what=f"http source -> MQTT, {rate:,.0f} posts/s of {args.batch} events"
                        " (`bench/http_source.py`)",
                        agent=f"{result['events_per_s']:,.0f} events/s, post p99"
                        f" {result['post_p99_ms']:.1f} ms, end-to-end p99 {p99:.1f} ms",
                        values={**result, "e2e_p50_ms": p50, "e2e_p99_ms": p99, "rss_mib": rss},
                    )
                )
        finally:
            broker.stop()
    write_results(args.json, "http_source", rows, info)


if __name__ == "__main__":
    main()
