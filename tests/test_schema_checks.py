"""A plugin Config's checks are reported at the option's key path, all at once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_agent import Duration, OptionError, option
from edge_agent.schema import build

pytestmark = pytest.mark.timeout(60)


def must_be_a_topic_filter(value: str) -> None:
    if " " in value:
        raise ValueError("is not a topic filter: it holds a space")


@dataclass(kw_only=True)
class Thermal:
    zone: str = option(doc="The thermal zone.")
    interval: Duration = option(10.0, above=0, doc="Time between readings.")
    timeout: Duration = option(5.0, doc="Longest wait for one reading.")
    level: str = option("info", choices=["info", "debug"], doc="How much to say.")
    units: list[str] = option(["C"], choices=["C", "F"], doc="Units to report.")
    topic: str = option("t/#", validator=must_be_a_topic_filter, doc="Where.")
    port: int = option(1883, min=1, max=65535, doc="Port.")

    def __post_init__(self) -> None:
        if self.timeout >= self.interval:
            raise OptionError("timeout", "must be less than interval")


def check(table: dict) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    built = build(Thermal, table, "sources.thermal[1]", problems)
    assert (built is None) == bool(problems)
    return problems


def test_every_problem_of_a_table_at_its_option_even_beside_a_type_error():
    problems = check(
        {
            "zone": "cpu",
            "interval": "1s",
            "timeout": "2s",  # refused in __post_init__
            "level": "loud",
            "units": ["C", "K"],
            "topic": "a b",
            "port": "1883x",  # a type error: used to hide the __post_init__ problem
        }
    )
    assert problems == [
        ("sources.thermal[1].level", 'must be one of "info", "debug", got "loud"'),
        ("sources.thermal[1].units", 'must be one of "C", "F", got "K"'),
        ("sources.thermal[1].topic", "is not a topic filter: it holds a space"),
        ("sources.thermal[1].port", 'expected an integer, got a string "1883x"'),
        (
            "sources.thermal[1].timeout",
            "must be less than interval (found with defaults in place of the wrong values above)",
        ),
    ]


def test_range_checks_name_the_option():
    assert check({"zone": "cpu", "interval": 0, "port": 0}) == [
        ("sources.thermal[1].interval", "must be more than 0, got 0"),
        ("sources.thermal[1].port", "must be 1 to 65535, got 0"),
    ]


def test_a_post_init_problem_says_which_defaults_stood_in():
    # interval is wrong, so its default (10s) stands in while __post_init__ runs.
    assert check({"zone": "cpu", "interval": "soon", "timeout": "20s"}) == [
        (
            "sources.thermal[1].interval",
            "'soon' is not a duration; write a number with ms, s, m, h, d or w, such as \"10s\"",
        ),
        (
            "sources.thermal[1].timeout",
            "must be less than interval (found with defaults in place of the wrong values above)",
        ),
    ]


def test_a_post_init_problem_about_a_wrong_option_is_left_out():
    @dataclass(kw_only=True)
    class Self:
        interval: Duration = option(10.0)

        def __post_init__(self) -> None:
            raise OptionError("interval", "is refused whatever it is")

    found: list[tuple[str, str]] = []
    build(Self, {"interval": "soon"}, "s", found)
    assert [where for where, _ in found] == ["s.interval"]


def test_a_plain_value_error_is_placed_at_the_option_it_names():
    @dataclass(kw_only=True)
    class Plain:
        interval: float = option(1.0)
        tls_file: str = option("")

        def __post_init__(self) -> None:
            if self.interval > 5:
                raise ValueError("interval must be at most 5 when polling")
            if self.tls_file:
                raise ValueError(f"tls_file: cannot read {self.tls_file}")

    def problems_of(table: dict) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        build(Plain, table, "sinks.x[0]", found)
        return found

    assert problems_of({"interval": 9}) == [
        ("sinks.x[0].interval", "interval must be at most 5 when polling")
    ]
    assert problems_of({"tls_file": "/nope"}) == [("sinks.x[0].tls_file", "cannot read /nope")]


def test_a_required_option_missing_skips_post_init():
    assert check({"timeout": "20s"}) == [
        ("sources.thermal[1].zone", "missing required key (a string)")
    ]


def test_valid_table_builds():
    problems: list[tuple[str, str]] = []
    built = build(Thermal, {"zone": "cpu", "units": ["F"], "level": "debug"}, "s", problems)
    assert problems == [] and built.units == ["F"] and built.level == "debug"
