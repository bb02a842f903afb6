"""``edge-agent check --connect``: open each configured sink once, as the agent would.

Each sink is made from its validated config and its own :meth:`Sink.open` is
called (TLS and credentials included), then :meth:`Sink.close`, each sink in a
thread of its own so that one slow destination does not hold up the others'
answers. ``Sink.probing`` is set, so a sink leaves out what would disturb an
agent running beside the check (the MQTT sink uses its client id plus
``-check`` and publishes no status).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

from edge_agent.config import Config, InstanceConfig


@dataclass
class Probe:
    """One sink's answer: where it connects, and why it could not (None: it did)."""

    name: str
    target: str
    problem: str | None = None
    seconds: float = 0.0


def probe_sinks(config: Config, timeout: float) -> list[Probe]:
    """Open and close every sink of ``config`` at once; a sink that has not answered
    within ``timeout`` seconds is reported as such (its thread is left to end alone)."""
    probes = [Probe(instance.name, instance.plugin) for instance in config.sinks]
    finished = [threading.Event() for _ in probes]
    sinks: list = [None] * len(probes)

    def run(index: int, instance: InstanceConfig) -> None:
        probe = probes[index]
        started = time.monotonic()
        try:
            sink = instance.registration.cls(
                name=instance.name, config=instance.config, agent_id=config.agent.id
            )
            sink.probing = True
            sinks[index] = sink
            with contextlib.suppress(Exception):
                probe.target = sink.target
            try:
                sink.open()
            finally:
                with contextlib.suppress(Exception):
                    sink.close()
        except Exception as exc:
            probe.problem = str(exc) or type(exc).__name__
        probe.seconds = time.monotonic() - started
        finished[index].set()

    threads = [
        threading.Thread(target=run, args=(i, s), name=f"check-{s.name}", daemon=True)
        for i, s in enumerate(config.sinks)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for index, probe in enumerate(probes):
        if not finished[index].wait(max(0.0, deadline - time.monotonic())):
            probe.problem = f"no answer within {timeout:g}s (--timeout)"
            probe.seconds = timeout
            if sinks[index] is not None:
                sinks[index].stopping.set()  # cut its waits short
    return probes
