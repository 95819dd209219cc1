"""The zygote's wire protocol (sllm_knative/local/zygote.py), shared by the local backend and
`python -m functions.zygote`: one JSON line per request, validated where it arrives."""

from __future__ import annotations

import json

import pytest

from sllm_knative.local.zygote import SpawnRequest, reply


def test_a_request_survives_the_wire():
    req = SpawnRequest(["--checkpoint", "hf://org/m", "--loader", "unix:///l.sock"], "/logs/i.log", {"A": "1"})
    line = req.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert SpawnRequest.decode(line) == req
    assert SpawnRequest.decode(json.dumps({"argv": [], "log": "/l"})) == SpawnRequest([], "/l", {})


@pytest.mark.parametrize("doc,message", [
    pytest.param([], "JSON object", id="not-an-object"),
    pytest.param({"log": "/l"}, "argv", id="no-argv"),
    pytest.param({"argv": ["--port", 8080], "log": "/l"}, "argv", id="argv-not-strings"),
    pytest.param({"argv": []}, "log", id="no-log"),
    pytest.param({"argv": [], "log": "/l", "env": {"A": 1}}, "env", id="env-not-strings"),
    pytest.param({"argv": [], "log": "/l", "lease": {"model": "m"}}, "unknown request fields: lease",
                 id="the-zygote-takes-no-lease"),
])
def test_a_bad_request_is_refused_naming_what(doc, message):
    with pytest.raises(ValueError, match=message):
        SpawnRequest.decode(json.dumps(doc))


def test_replies():
    assert json.loads(reply(42)) == {"pid": 42}
    assert json.loads(reply(error="bad")) == {"error": "bad"}
