"""`free_port`: the ports one process asks for in a row are distinct, bindable, and drawn from
below the kernel's ephemeral range (or from `SLLM_PORT_RANGE`)."""

from __future__ import annotations

import collections
import socket

import pytest

from sllm_knative import ports
from sllm_knative.ports import (
    default_range,
    ephemeral_range,
    free_port,
    parse_range,
    port_range,
    split_range,
)


def test_ports_asked_for_in_a_row_are_distinct_and_free():
    # An instance takes --port and --internal-port this way; equal ones made it exit (CI, stop 28).
    got = [free_port() for _ in range(300)]
    assert len(set(got)) == len(got)
    for p in got[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_ports_come_from_outside_the_ephemeral_range():
    # An outgoing connection's source port comes from the ephemeral range; a port handed out from
    # there could be taken by one before its server binds it (CI: an activator's EADDRINUSE).
    lo, hi = ephemeral_range()
    span = port_range()
    assert span is not None, "this host's ephemeral range leaves room below it"
    for p in (free_port() for _ in range(200)):
        assert not lo <= p <= hi
        assert span[0] <= p <= span[1]


@pytest.mark.parametrize("text, want", [
    ("20000-20010", (20000, 20010)),
    (" 1-65535 ", (1, 65535)),
    ("32768\t60999".replace("\t", "-"), (32768, 60999)),
    ("5000-5000", (5000, 5000)),
])
def test_parse_range_reads_lo_hi(text, want):
    assert parse_range(text) == want


@pytest.mark.parametrize("text", ["", "20000", "20000-", "-20000", "b-c", "0-10", "10-5", "1-70000",
                                  "1.5-20"])
def test_parse_range_names_the_variable_and_the_text(text):
    with pytest.raises(ValueError, match=rf"SLLM_PORT_RANGE={text!r}: expected LO-HI"):
        parse_range(text)


@pytest.mark.parametrize("contents, want", [
    ("32768\t60999\n", (32768, 60999)),
    ("49152 65535\n", (49152, 65535)),
    ("garbage\n", ports.LINUX_EPHEMERAL),
    (None, ports.LINUX_EPHEMERAL),  # no file (not Linux, or no /proc)
])
def test_ephemeral_range_reads_the_kernel_file(tmp_path, contents, want):
    path = tmp_path / "ip_local_port_range"
    if contents is not None:
        path.write_text(contents)
    assert ephemeral_range(path) == want


@pytest.mark.parametrize("ephemeral, want", [
    ((32768, 60999), (10000, 32767)),   # Linux's default
    ((49152, 65535), (10000, 49151)),   # IANA's, and Windows' and macOS's
    ((11024, 65535), (10000, 11023)),   # exactly MIN_WIDTH wide
    ((11023, 65535), None),             # one narrower: the OS picks
    ((1024, 65535), None),              # everything is ephemeral
])
def test_default_range_is_the_gap_below_the_ephemeral_range(ephemeral, want):
    assert default_range(ephemeral) == want


@pytest.mark.parametrize("env, want", [
    ({}, (10000, 32767)),
    ({"SLLM_PORT_RANGE": ""}, (10000, 32767)),
    ({"SLLM_PORT_RANGE": "40000-40100"}, (40000, 40100)),  # set explicitly: taken as given
])
def test_port_range_prefers_the_variable(env, want):
    assert port_range(env, ephemeral=(32768, 60999)) == want


def test_a_bad_port_range_variable_is_an_error_not_a_default():
    with pytest.raises(ValueError, match="SLLM_PORT_RANGE='40000'"):
        port_range({"SLLM_PORT_RANGE": "40000"})


@pytest.mark.parametrize("span, index, count, want", [
    ((10000, 32767), 0, 2, (10000, 21383)),
    ((10000, 32767), 1, 2, (21384, 32767)),
    ((10000, 10009), 2, 3, (10006, 10009)),  # the last slice takes the remainder
    ((10000, 10009), 0, 1, (10000, 10009)),
])
def test_split_range_gives_disjoint_slices(span, index, count, want):
    assert split_range(span, index, count) == want


@pytest.mark.parametrize("span, index, count", [((1, 2), 0, 3), ((1, 100), 2, 2), ((1, 100), -1, 2)])
def test_split_range_refuses_what_cannot_be_split(span, index, count):
    with pytest.raises(ValueError):
        split_range(span, index, count)


def test_free_port_draws_from_the_variable_and_skips_a_bound_port(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setenv("SLLM_PORT_RANGE", f"{taken}-{taken + 1}")
        monkeypatch.setattr(ports, "_RECENT", collections.deque(maxlen=4096))
        # `taken` is bound here, so only taken+1 can come back (if it is free at all).
        try:
            assert free_port() == taken + 1
        except OSError as e:
            assert "that was not handed out lately" in str(e)
        # and once handed out, not again
        with pytest.raises(OSError, match=f"in {taken}-{taken + 1}"):
            free_port()
