"""The instance's internal API over HTTP (a real `python -m functions.llm` process): every body is
validated on arrival against the types both ends use (sllm_knative/api/instance.py), and a
malformed one is a 400 whose `param` names the field, never a 500."""

from __future__ import annotations

import json

import httpx
import pytest

from sllm_knative.api import instance as api

GOOD_STATE = {"version": 1, "id": "cmpl-bodies-000", "kind": "completion", "tokens": [5, 6, 7], "prompt_len": 2,
              "position": 3, "sampling": {"max_tokens": 4}, "text_offset": 0}


def _state(**changes: object) -> dict:
    return {"state": {**GOOD_STATE, **changes}}


@pytest.mark.parametrize(("path", "body", "field"), [
    # detach
    pytest.param(api.detach_path("cmpl-x"), {"position": "3"}, "position", id="detach-position-string"),
    pytest.param(api.detach_path("cmpl-x"), {"position": -1}, "position", id="detach-position-negative"),
    pytest.param(api.detach_path("cmpl-x"), {"position": True}, "position", id="detach-position-bool"),
    pytest.param(api.detach_path("cmpl-x"), {"position": {"at": 3}}, "position", id="detach-position-nested"),
    pytest.param(api.detach_path("cmpl-x"), [3], None, id="detach-not-an-object"),
    # prefill
    pytest.param(api.PREFILL, {"start": 0, "tokens": [1, 2]}, "id", id="prefill-no-id"),
    pytest.param(api.PREFILL, {"id": 7, "tokens": [1, 2]}, "id", id="prefill-id-int"),
    pytest.param(api.PREFILL, {"id": "", "tokens": [1, 2]}, "id", id="prefill-id-empty"),
    pytest.param(api.PREFILL, {"id": "g", "start": 0}, "tokens", id="prefill-no-tokens"),
    pytest.param(api.PREFILL, {"id": "g", "tokens": []}, "tokens", id="prefill-tokens-empty"),
    pytest.param(api.PREFILL, {"id": "g", "tokens": "1 2"}, "tokens", id="prefill-tokens-string"),
    pytest.param(api.PREFILL, {"id": "g", "tokens": [1, "2"]}, "tokens[1]", id="prefill-token-string"),
    pytest.param(api.PREFILL, {"id": "g", "tokens": [[1, 2]]}, "tokens[0]", id="prefill-tokens-nested"),
    pytest.param(api.PREFILL, {"id": "g", "start": -2, "tokens": [1]}, "start", id="prefill-start-negative"),
    pytest.param(api.PREFILL, {"id": "g", "start": 1.5, "tokens": [1]}, "start", id="prefill-start-float"),
    pytest.param(api.PREFILL, {"id": "g", "tokens": [1], "wait": "no"}, "wait", id="prefill-wait-string"),
    # resume
    pytest.param(api.RESUME, {}, "state", id="resume-no-state"),
    pytest.param(api.RESUME, {"state": [GOOD_STATE]}, "state", id="resume-state-nested-in-a-list"),
    pytest.param(api.RESUME, {"state": {"state": GOOD_STATE}}, "state.version", id="resume-state-nested-twice"),
    pytest.param(api.RESUME, _state(version=9), "state.version", id="resume-version"),
    pytest.param(api.RESUME, _state(id=3), "state.id", id="resume-id-int"),
    pytest.param(api.RESUME, _state(tokens=[5, "6", 7]), "state.tokens[1]", id="resume-token-string"),
    pytest.param(api.RESUME, _state(tokens=5), "state.tokens", id="resume-tokens-int"),
    pytest.param(api.RESUME, _state(prompt_len="2"), "state.prompt_len", id="resume-prompt-len-string"),
    pytest.param(api.RESUME, _state(sampling=[{"max_tokens": 4}]), "state.sampling", id="resume-sampling-list"),
    pytest.param(api.RESUME, _state(sampling={"logprobs": {"n": 1}}), "state.sampling.logprobs",
                 id="resume-logprobs-nested"),
    pytest.param(api.RESUME, _state(text_offset=None), "state.text_offset", id="resume-text-offset-null"),
    # past the types, the instance's own check of the whole state names the field the same way
    pytest.param(api.RESUME, _state(kind="poem"), "state.kind", id="resume-kind-unknown"),
    pytest.param(api.RESUME, _state(position=9), "state.position", id="resume-position-mismatch"),
])
def test_internal_api_names_the_bad_field(functions, path: str, body: object, field: str | None) -> None:
    a, _ = functions
    r = httpx.post(f"{a.internal_url}{path}", json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err
    assert field is None or field.split("[")[0] in err["message"], err


def test_internal_api_refuses_non_finite_numbers(functions) -> None:
    """JSON as Python reads it has Infinity and NaN: in a state they are a 400, not an overflow."""
    a, _ = functions
    full = '"temperature": 0, "top_p": 1, "seed": null, "max_tokens": 4, "stop": [], "ignore_eos": false'
    for sampling, field in (('{"top_k": Infinity, "logprobs": null, ' + full + '}', "state.sampling"),
                            ('{"logprobs": NaN}', "state.sampling.logprobs")):
        raw = json.dumps({"state": {**GOOD_STATE, "sampling": "@"}}).replace('"@"', sampling)
        r = httpx.post(f"{a.internal_url}{api.RESUME}", content=raw, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_internal_api_rejects_unreadable_json(functions) -> None:
    a, _ = functions
    for path in (api.PREFILL, api.RESUME, api.detach_path("cmpl-x")):
        r = httpx.post(f"{a.internal_url}{path}", content=b"{not json", timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def test_internal_api_answers_match_the_types(functions) -> None:
    a, _ = functions
    base = a.internal_url
    api.GenerationList.model_validate(httpx.get(f"{base}{api.GENERATIONS}", timeout=10).json())
    r = httpx.post(f"{base}{api.PREFILL}", json={"id": "cmpl-typed-prefill", "tokens": [3, 4, 5]}, timeout=30)
    assert api.PrefillResponse.model_validate(r.json()) == api.PrefillResponse(id="cmpl-typed-prefill", cached=2,
                                                                               tokens=3)
    listed = api.GenerationList.model_validate(httpx.get(f"{base}{api.GENERATIONS}", timeout=10).json())
    assert any(g.id == "cmpl-typed-prefill" and g.status == "parked" for g in listed.data)
    r = httpx.delete(f"{base}{api.prefill_path('cmpl-typed-prefill')}", timeout=10)
    assert api.DropPrefillResponse.model_validate(r.json()).dropped
