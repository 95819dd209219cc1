"""The official openai client against the function serving the real model: its own chat template
(system messages, the generation prompt), the end-of-turn stop, usage, streaming, stop sequences,
logprobs and `n`. Every expected value comes from the model's tokenizer or from another request,
never from a constant that the server could simply echo."""

from __future__ import annotations

from typing import Any

import pytest

from tests.realmodel.conftest import ANSWER, NAME, QUESTION, STORY

CONVERSATIONS = {
    "system and user": QUESTION,
    # No system message: SmolLM2's template puts in its own default one.
    "user only": [{"role": "user", "content": "Name a colour."}],
    "several turns": [*QUESTION, {"role": "assistant", "content": ANSWER},
                      {"role": "user", "content": "And of Italy?"}],
}


@pytest.fixture(scope="module")
def client(function) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{function.url}/v1", api_key="unused", max_retries=0, timeout=120)


def prompt_tokens(tokenizer: Any, messages: list[dict]) -> int:
    """What the model's own template makes of the messages, with the assistant's turn opened."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_a_real_answer_that_stops_on_the_end_of_turn_token(client, tokenizer) -> None:
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0, logprobs=True)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ANSWER
    # It stopped on the model's end-of-turn token (well before max_tokens), which is generated
    # and counted, as vLLM counts it, but not part of the text.
    tokens = [t.token for t in choice.logprobs.content]
    assert choice.finish_reason == "stop" and tokens[-1] == "<|im_end|>" and len(tokens) < 40
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer(tokens[-1], add_special_tokens=False).input_ids
    assert "<|im_end|>" not in choice.message.content
    assert "".join(tokens[:-1]) == ANSWER
    assert r.usage.completion_tokens == len(tokens)
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, QUESTION)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("messages", list(CONVERSATIONS.values()), ids=list(CONVERSATIONS))
def test_the_prompt_is_the_models_own_template_with_the_generation_prompt(client, tokenizer, messages) -> None:
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, messages)
    # Without the generation prompt the template ends after the last message: three tokens fewer
    # ("<|im_start|>", "assistant", "\n"), so the count above tells the two apart.
    bare = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert len(tokenizer(bare, add_special_tokens=False).input_ids) < r.usage.prompt_tokens


def test_the_conversation_is_followed(client) -> None:
    r = client.chat.completions.create(model=NAME, messages=CONVERSATIONS["several turns"], max_tokens=40,
                                       temperature=0)
    assert "Rome" in r.choices[0].message.content


def test_streaming_gives_the_same_answer_and_usage(client) -> None:
    whole = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == whole.usage.model_dump()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("stop", ["Paris", "France is P"])
def test_stop_sequences_cut_the_text_before_them(client, stop: str, stream: bool) -> None:
    full = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0, logprobs=True)
    tokens = [t.token for t in full.choices[0].logprobs.content]
    # The tokens generated up to the one that completes the stop sequence.
    upto = next(i + 1 for i in range(len(tokens)) if stop in "".join(tokens[:i + 1]))
    kwargs: dict[str, Any] = dict(model=NAME, messages=QUESTION, max_tokens=40, temperature=0, stop=[stop])
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(**kwargs)
        text, finish, usage = r.choices[0].message.content, [r.choices[0].finish_reason], r.usage
    assert text == ANSWER[:ANSWER.index(stop)]
    assert finish == ["stop"]
    assert usage.completion_tokens == upto


def test_logprobs_are_the_models_with_sorted_alternatives(client) -> None:
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content[:-1]) == ANSWER
    for t in content:
        alts = [a.logprob for a in t.top_logprobs]
        assert len(alts) == 3 and alts == sorted(alts, reverse=True) and all(a <= 0 for a in alts)
        assert t.logprob == alts[0]  # greedy takes the most likely token (or one tied with it)
        assert t.token in {a.token for a in t.top_logprobs if a.logprob == alts[0]}
        assert bytes(t.bytes).decode() == t.token
    # A confident model: "Paris" after "The capital of France is".
    paris = next(t for t in content if t.token == " Paris")
    assert paris.logprob > -1.0


def test_n_choices_are_seeded_and_counted(client) -> None:
    import openai

    kwargs: dict[str, Any] = dict(model=NAME, messages=STORY, temperature=1.0, max_tokens=24, logprobs=True, seed=11)
    r = client.chat.completions.create(**kwargs, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3, texts  # three samples, not one copied
    assert r.usage.prompt_tokens == client.chat.completions.create(**kwargs).usage.prompt_tokens  # counted once
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    # Choice i samples with seed + i: the same as a one-choice request with that seed, and again the same.
    assert [client.chat.completions.create(**{**kwargs, "seed": 11 + i}).choices[0].message.content
            for i in range(3)] == texts
    assert [c.message.content for c in client.chat.completions.create(**kwargs, n=3).choices] == texts
    # Streamed, the same choices arrive interleaved, each under its index, then one usage for all.
    got, usage = ["", "", ""], None
    for chunk in client.chat.completions.create(**kwargs, n=3, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
    assert got == texts and usage is not None and usage.model_dump() == r.usage.model_dump()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs, n=17)
    assert err.value.status_code == 400 and "'n' = 17" in str(err.value) and err.value.body["param"] == "n"


def test_plain_completions_use_no_template(client) -> None:
    r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert r.choices[0].text.startswith(" Paris")
    assert r.usage.prompt_tokens == 5
