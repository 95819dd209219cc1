"""The locally built tokenizer: every id a random model can sample decodes to text, and the
padding does not make the tokenizer slow to load (it is on every instance's cold path)."""

from __future__ import annotations

import time

import pytest

from sllm_knative.models import build_tokenizer


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> object:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out, vocab_size=512, model_vocab_size=8192)
    return AutoTokenizer.from_pretrained(str(out))


def test_every_model_id_decodes_to_visible_text(padded: object) -> None:
    tok = padded
    assert len(tok) == 8192  # type: ignore[arg-type]
    special = set(tok.all_special_ids)  # type: ignore[attr-defined]
    empty = [i for i in range(8192) if i not in special and not tok.decode([i]).strip()]  # type: ignore[attr-defined]
    # a few byte-level pieces (whitespace, control bytes) legitimately print as blanks
    assert len(empty) < 64, empty[:20]
    assert tok.decode([8000, 7000]) == " w8000 w7000"  # type: ignore[attr-defined]


def test_padding_leaves_encoding_unchanged(tmp_path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path / "plain", vocab_size=512)
    plain = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    build_tokenizer(tmp_path / "padded", vocab_size=512, model_vocab_size=4096)
    padded = AutoTokenizer.from_pretrained(str(tmp_path / "padded"))
    for text in ["Serverless inference scales to zero", "hello w8000 w12", "  spaces\tand\ttabs  "]:
        assert padded.encode(text) == plain.encode(text)
        assert padded.decode(padded.encode(text)) == text


def test_padded_tokenizer_loads_as_fast_as_the_plain_one(tmp_path) -> None:
    """Padding as added tokens made each load about 0.15 s slower; vocabulary entries cost nothing.
    Relative check (best of 3 each) so machine speed does not matter."""
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path / "plain", vocab_size=512)
    build_tokenizer(tmp_path / "padded", vocab_size=512, model_vocab_size=8192)

    def best(path: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            AutoTokenizer.from_pretrained(path)
            times.append(time.perf_counter() - t0)
        return min(times)

    best(str(tmp_path / "plain"))  # imports and caches
    plain, padded = best(str(tmp_path / "plain")), best(str(tmp_path / "padded"))
    assert padded < 3 * plain + 0.02, (plain, padded)
