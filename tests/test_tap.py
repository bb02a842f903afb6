"""``edge-agent tap``: a live view of committed events through the state dir's socket."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading

import pytest
from conftest import run_cli

from edge_agent.event import Event
from edge_agent.tap import MISSED_LINE, SOCKET_NAME, TapServer, connect, follow
from edge_agent.testing import wait_for


def tail_config(tmp_path) -> str:
    """Two tail sources (a.log, b.log) and the stdout sink: no broker needed."""
    return f"""
        [agent]
        id = "tap-gw"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "1s"

        [[sources.tail]]
        name = "alpha"
        paths = ["{tmp_path / "a.log"}"]

        [[sources.tail]]
        name = "beta"
        paths = ["{tmp_path / "b.log"}"]

        [[sinks.stdout]]
        """


def _sigint_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Tapper:
    """``edge-agent tap ARGS`` as a child process, its output in files."""

    def __init__(self, tmp_path, name: str, *args: str, stdout=None) -> None:
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        self._err = open(self.err_path, "w")  # noqa: SIM115 (closed in wait)
        self._out = None if stdout is not None else open(self.out_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "tap", "-c", str(tmp_path / "agent.toml"), *args],
            stdout=stdout if stdout is not None else self._out,
            stderr=self._err,
            # As from a terminal: a test run started in the background (`make test &`)
            # passes SIGINT on ignored, and Python then never turns it into Ctrl-C.
            preexec_fn=_sigint_as_at_a_terminal,
        )

    def err(self) -> str:
        return self.err_path.read_text()

    def lines(self) -> list[str]:
        return self.out_path.read_text().splitlines()

    def wait_tapping(self) -> None:
        wait_for(lambda: "tap: showing events" in self.err(), 20, f"the tap to start: {self.err()}")

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            said = self.err()
            raise AssertionError(f"the tap still runs after {timeout}s; it said: {said}") from None
        finally:
            self._err.close()
            if self._out is not None:
                self._out.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


@pytest.fixture
def tappers():
    made: list[Tapper] = []
    yield made
    for tapper in made:
        tapper.kill()


def append(path, *lines: str) -> None:
    with open(path, "a") as handle:
        handle.write("".join(f"{line}\n" for line in lines))


def test_tap_shows_what_is_committed_to_several_tappers(tmp_path, agent_process, tappers):
    (tmp_path / "a.log").write_text("")
    (tmp_path / "b.log").write_text("")
    agent = agent_process(tail_config(tmp_path)).start()
    agent.wait_ready(20)
    sock = tmp_path / "state" / SOCKET_NAME
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # owner only

    everything = Tapper(tmp_path, "all", "--json")
    only_beta = Tapper(tmp_path, "beta", "--source", "b*", "--type", "log.*")
    no_match = Tapper(tmp_path, "none", "--json", "--type", "file.*")
    tappers += [everything, only_beta, no_match]
    for tapper in tappers:
        tapper.wait_tapping()

    append(tmp_path / "a.log", "one", "two")
    append(tmp_path / "b.log", "three")
    wait_for(lambda: len(everything.lines()) == 3, 20, "three events at the first tapper")
    wait_for(lambda: len(only_beta.lines()) == 1, 20, "one event at the second tapper")

    events = [json.loads(line) for line in everything.lines()]
    by_line = {e["data"]["line"]: e for e in events}
    assert set(by_line) == {"one", "two", "three"}
    assert by_line["one"]["source"] == "edge-agent://tap-gw/alpha"
    assert by_line["one"]["specversion"] == "1.0"
    assert by_line["three"]["type"] == "log.line"
    # The same sequence numbers the sinks see.
    assert int(by_line["two"]["sequence"]) == int(by_line["one"]["sequence"]) + 1

    human = only_beta.lines()[0]
    assert " beta log.line " in human and '"line":"three"' in human
    assert no_match.lines() == []

    assert agent.terminate() == 0
    for tapper in tappers:
        assert tapper.wait() == 0
        assert "stopped; the tap ended" in tapper.err()
        assert "Traceback" not in tapper.err()
    assert not sock.exists()  # removed on stop


def test_tap_without_a_running_agent_says_so(tmp_path):
    (tmp_path / "a.log").write_text("")
    (tmp_path / "b.log").write_text("")
    (tmp_path / "agent.toml").write_text(tail_config(tmp_path))
    result = run_cli("tap", "-c", str(tmp_path / "agent.toml"))
    assert result.returncode == 1
    assert "no edge-agent is running on state dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_stale_socket_of_a_killed_agent_is_replaced(tmp_path, agent_process, tappers):
    (tmp_path / "a.log").write_text("")
    (tmp_path / "b.log").write_text("")
    agent = agent_process(tail_config(tmp_path)).start()
    agent.wait_ready(20)
    agent.kill()
    sock = tmp_path / "state" / SOCKET_NAME
    assert sock.exists()  # what a SIGKILL leaves behind
    result = run_cli("tap", "-c", str(tmp_path / "agent.toml"))
    assert result.returncode == 1 and "no edge-agent is running" in result.stderr

    agent.start()
    agent.wait_ready(20)
    tapper = Tapper(tmp_path, "after", "--json")
    tappers.append(tapper)
    tapper.wait_tapping()
    append(tmp_path / "a.log", "again")
    wait_for(lambda: len(tapper.lines()) == 1, 20, "the event through the new socket")


def test_ctrl_c_and_a_closed_pipe_end_the_tap_cleanly(tmp_path, agent_process, tappers):
    (tmp_path / "a.log").write_text("")
    (tmp_path / "b.log").write_text("")
    agent = agent_process(tail_config(tmp_path)).start()
    agent.wait_ready(20)

    interrupted = Tapper(tmp_path, "interrupted")
    piped = Tapper(tmp_path, "piped", "--json", stdout=subprocess.PIPE)  # as `| head -1`
    tappers += [interrupted, piped]
    interrupted.wait_tapping()
    piped.wait_tapping()
    append(tmp_path / "a.log", "first")
    assert json.loads(piped.process.stdout.readline())["data"]["line"] == "first"
    piped.process.stdout.close()  # the reader goes away
    interrupted.process.send_signal(signal.SIGINT)
    assert interrupted.wait() == 0
    # The piped tapper notices at its next write.
    append(tmp_path / "a.log", *(f"line {i}" for i in range(50)))
    assert piped.wait() == 0
    for tapper in (interrupted, piped):
        assert "Traceback" not in tapper.err()
        assert "Broken pipe" not in tapper.err()
    assert agent.terminate() == 0


class _Writer:
    tapped = None


def test_a_slow_tapper_is_told_what_it_missed_and_never_holds_the_writer(tmp_path):
    writer = _Writer()
    server = TapServer(str(tmp_path), "gw", writer)
    server.limit = 10
    server.start()
    try:
        sock, reader, agent_id = connect(str(tmp_path), [], [])
        assert agent_id == "gw"
        wait_for(lambda: writer.tapped is not None, 10, "the tapper to be registered")
        # The tapper reads nothing yet: the socket's buffer fills, then the tap's.
        offered = 0
        data = json.dumps({"line": "x" * 1000})
        for _ in range(200):
            events = [(Event(source="s", type="log.line", data={}), data) for _i in range(100)]
            offered += len(events)
            writer.tapped(events, {"s": offered})  # returns at once, whatever the tapper does
        lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            for raw in reader:
                lines.append(raw.decode())
                if (
                    len(lines)
                    and sum(
                        json.loads(x).get("missed", 0) if x.startswith('{"missed"') else 1
                        for x in lines
                    )
                    >= offered
                ):
                    break
            done.set()

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        assert done.wait(30), "every event shown or counted as missed"
        events = [json.loads(x) for x in lines if not x.startswith('{"missed"')]
        missed = sum(json.loads(x)["missed"] for x in lines if x.startswith('{"missed"'))
        assert missed > 0
        assert len(events) + missed == offered
        # Shown in order, with the sequences the writer gave them.
        sequences = [int(e["sequence"]) for e in events]
        assert sequences == sorted(sequences)
        reader.close()
        sock.close()
    finally:
        server.stop()
    assert writer.tapped is None
    assert not os.path.exists(tmp_path / SOCKET_NAME)


def test_missed_lines_are_printed_for_people_and_kept_off_json_output():
    sent = (
        b'{"specversion":"1.0","source":"edge-agent://g/s","type":"t","time":'
        b'"2026-12-01T10:00:00.123456Z","data":{"a":1}}\n'
        b'{"missed": 7}\n'
    )
    out, err = io.StringIO(), io.StringIO()
    assert follow(io.BytesIO(sent), False, out, err)
    assert out.getvalue() == '10:00:00.123 s t {"a":1}\n' + MISSED_LINE.format(count=7) + "\n"
    out, err = io.StringIO(), io.StringIO()
    assert follow(io.BytesIO(sent), True, out, err)
    assert out.getvalue().startswith('{"specversion"') and "missed" not in out.getvalue()
    assert err.getvalue() == "tap: 7 events not shown (the tap could not keep up)\n"


def test_the_socket_path_may_be_longer_than_a_unix_address(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    writer = _Writer()
    server = TapServer(str(deep), "gw", writer)
    server.start()
    try:
        sock, reader, agent_id = connect(str(deep), ["*"], [])
        assert agent_id == "gw"
        reader.close()
        sock.close()
    finally:
        server.stop()


def test_only_the_owner_may_connect(tmp_path):
    writer = _Writer()
    server = TapServer(str(tmp_path), "gw", writer)
    server.start()
    try:
        mode = stat.S_IMODE(os.stat(tmp_path / SOCKET_NAME).st_mode)
        assert mode == 0o600
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(tmp_path / SOCKET_NAME))
            raw.sendall(b"not json\n")
            assert b"expects one JSON line" in raw.recv(4096)
    finally:
        server.stop()
