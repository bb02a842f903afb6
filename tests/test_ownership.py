"""One owner per state directory, and what an operator sees when it is taken or lost."""

from __future__ import annotations

import pytest
from conftest import mqtt_agent_config, run_cli

pytestmark = pytest.mark.timeout(60)


def test_a_second_agent_on_the_same_state_dir_exits_1_naming_the_first(
    tmp_path, running_broker, agent_process
):
    first = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    first.wait_started()
    second = run_cli("run", "-c", str(first.config_path))
    assert second.returncode == 1
    assert f"state dir {first.state_dir} is in use by pid {first.pid}" in second.stderr
    assert "stop it first" in second.stderr and "Traceback" not in second.stderr
    assert first.process.poll() is None, "the first agent runs on"
    # The kernel lets go of the lock however the owner ends: a killed agent blocks nobody.
    first.kill()
    first.start()
    first.wait_started()
    assert first.terminate() == 0
