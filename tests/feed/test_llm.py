"""The simulated LLM: deterministic answers, English and CJK, paced like a model."""

from __future__ import annotations

import pytest

from realtime_lab.feed.llm import answer_text, answer_tokens, paced_tokens, ticker_word

PROMPT = "How does streaming work"


def is_cjk(text: str) -> bool:
    return any("\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef" for ch in text)


def test_same_prompt_and_seed_give_the_same_tokens() -> None:
    assert answer_tokens(PROMPT, 3) == answer_tokens(PROMPT, 3)
    assert answer_text(PROMPT, 3) == "".join(answer_tokens(PROMPT, 3))


def test_another_seed_or_prompt_gives_another_answer() -> None:
    answers = {answer_text(PROMPT, seed) for seed in range(10)}
    assert len(answers) == 10
    assert answer_text(PROMPT, 1) != answer_text(PROMPT + "?", 1)


def test_answers_mix_english_and_cjk() -> None:
    tokens = [t for seed in range(8) for t in answer_tokens(PROMPT, seed)]
    cjk = [t for t in tokens if is_cjk(t)]
    english = [t for t in tokens if t.strip().isascii() and t.strip().isalpha()]
    assert cjk, "no CJK token in 8 answers"
    assert english, "no English token in 8 answers"
    # A CJK token is one character: the multi-byte case streaming code must get right.
    assert all(len(t) == 1 for t in cjk)


@pytest.mark.parametrize("max_tokens", [1, 5, 8, 50, 120, 500])
def test_max_tokens_bounds_the_answer(max_tokens: int) -> None:
    for seed in range(5):
        tokens = answer_tokens(PROMPT, seed, max_tokens=max_tokens)
        assert 1 <= len(tokens) <= max_tokens
        assert all(tokens)
        assert answer_text(PROMPT, seed, max_tokens=max_tokens) == "".join(tokens)


def test_answer_echoes_the_prompt_and_has_no_leading_space() -> None:
    text = answer_text("Explain websockets please", 0)
    assert text.startswith("About Explain websockets please:")
    for seed in range(20):
        assert not answer_text("?!", seed).startswith(" ")


def test_paced_tokens_are_the_answer_with_ttft_first() -> None:
    paced = list(paced_tokens(PROMPT, 4, ttft_ms=250.0, token_ms=10.0, max_tokens=60))
    assert [t.text for t in paced] == answer_tokens(PROMPT, 4, max_tokens=60)
    assert [t.index for t in paced] == list(range(len(paced)))
    assert paced[0].delay_s == pytest.approx(0.25)


@pytest.mark.parametrize("jitter", [0.0, 0.33, 0.9])
def test_paced_delays_stay_within_the_jitter(jitter: float) -> None:
    token_ms = 20.0
    delays = [
        t.delay_s
        for seed in range(5)
        for t in list(paced_tokens(PROMPT, seed, ttft_ms=0, token_ms=token_ms, jitter=jitter))[1:]
    ]
    low, high = token_ms * (1 - jitter) / 1000, token_ms * (1 + jitter) / 1000
    assert all(low - 1e-12 <= d <= high + 1e-12 for d in delays)
    if jitter:
        # Jittered, not constant: the spread covers most of the allowed band.
        assert max(delays) - min(delays) > (high - low) / 2
    else:
        assert set(delays) == {token_ms / 1000}


def test_pacing_is_deterministic_and_never_negative() -> None:
    a = list(paced_tokens(PROMPT, 9, token_ms=15.0))
    assert a == list(paced_tokens(PROMPT, 9, token_ms=15.0))
    assert all(t.delay_s >= 0 for t in paced_tokens(PROMPT, 9, ttft_ms=-5, token_ms=1, jitter=3))


def test_ticker_words_are_deterministic_and_mixed() -> None:
    words = [ticker_word(i) for i in range(200)]
    assert words == [ticker_word(i) for i in range(200)]
    assert any(is_cjk(w) for w in words)
    assert all(w for w in words)
