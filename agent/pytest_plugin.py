"""pytest fixtures for plugin authors, active wherever edge-event-agent is installed.

- ``mosquitto``: a throw-away Mosquitto broker on a free loopback port
  (``.port``, ``.stop()``, ``.start()``), stopped after the test.
- ``mqtt_subscriber``: a subscriber to ``#`` on that broker; ``.events()``
  returns the JSON payloads received so far.
- ``source_harness`` / ``sink_harness``: the classes of :mod:`edge_agent.testing`,
  for ``source_harness(MySource, {...config...})``; harnesses made through
  the fixture are stopped after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Mosquitto of this test's own on a free loopback port; ``.port``, ``.stop()``."""
    from edge_agent.testing import Mosquitto

    broker = Mosquitto(str(tmp_path_factory.mktemp("mosquitto")))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mqtt_subscriber(mosquitto: Any) -> Iterator[Any]:
    """A subscriber to ``#`` on the ``mosquitto`` broker; ``.events()`` gives the payloads."""
    from edge_agent.testing import Subscriber

    with Subscriber(mosquitto.port, "#") as subscriber:
        yield subscriber


@pytest.fixture
def source_harness() -> Iterator[Any]:
    """``source_harness(MySource, {config})``: a started SourceHarness, stopped after the test."""
    from edge_agent.testing import SourceHarness

    made: list[SourceHarness] = []

    def make(source_class: type, config: dict[str, Any], **kwargs: Any) -> SourceHarness:
        harness = SourceHarness(source_class, config, **kwargs).start()
        made.append(harness)
        return harness

    yield make
    for harness in made:
        if harness._thread.is_alive():
            harness.stop()


@pytest.fixture
def sink_harness() -> Any:
    """The SinkHarness class: ``sink_harness(MySink, {config}).deliver(events)``."""
    from edge_agent.testing import SinkHarness

    return SinkHarness
