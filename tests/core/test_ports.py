"""`free_port`: the ports one process asks for in a row are distinct and bindable."""

from __future__ import annotations

import socket

from sllm_knative.ports import free_port


def test_ports_asked_for_in_a_row_are_distinct_and_free():
    # An instance takes --port and --internal-port this way; equal ones made it exit (CI, stop 28).
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    for p in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
