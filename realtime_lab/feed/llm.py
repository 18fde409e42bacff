"""A deterministic stand-in for an LLM: same prompt and seed, same answer, token by token.

Answers mix English words (one token each, with their leading space) and CJK text (one character
a token), because real tokenisers produce both and multi-byte characters are where streaming
code breaks: a UTF-8 character split across two writes, a client that decodes per chunk.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

_SENTENCES: Final = (
    "Streaming lets the reader start before the writer finishes.",
    "Each token travels from the model to the browser as soon as it exists.",
    "Short polling asks again and again, paying a request for every answer.",
    "Long polling waits on the server until something new arrives.",
    "Server-Sent Events keep one response open and append to it.",
    "A WebSocket upgrades the connection and frames every message both ways.",
    "Heartbeats keep idle streams alive through proxies that close quiet connections.",
    "Resuming from the last event id means a dropped connection loses nothing.",
    "Bounded queues protect the server from a client that stops reading.",
    "Latency is the time from the token's birth to its arrival on screen.",
)
_ENGLISH: Final = tuple(" ".join(_SENTENCES).split())

_CJK: Final = (
    "流式输出让读者在作者写完之前就开始阅读。",
    "每个词元一生成就立即发送到浏览器。",
    "断线重连时从最后的事件编号继续，不丢失任何内容。",
    "服务器推送事件保持一个响应不断追加数据。",
)


@dataclass(frozen=True, slots=True)
class Token:
    """One piece of the answer and the pause before it."""

    index: int
    text: str
    delay_s: float


def answer_tokens(prompt: str, seed: int = 0, *, max_tokens: int = 120) -> list[str]:
    """The answer's tokens for ``prompt`` and ``seed``: deterministic, English and CJK mixed.

    Concatenate them to get the full answer text.
    """
    rng = random.Random(f"{seed}\x00{prompt}")
    words = max(8, min(max_tokens, 40 + rng.randrange(60)))
    tokens: list[str] = []
    echo = [w for w in prompt.split() if w.isalnum()][:3]
    if echo:
        tokens.append("About")
        tokens.extend(" " + w for w in echo)
        tokens.append(":")
    start = rng.randrange(len(_ENGLISH))
    while len(tokens) < words:
        if rng.random() < 0.15:
            sentence = rng.choice(_CJK)
            tokens.append(" ")
            tokens.extend(sentence)  # one character a token
        else:
            tokens.append(" " + _ENGLISH[(start + len(tokens)) % len(_ENGLISH)])
    if tokens and tokens[0].startswith(" "):
        tokens[0] = tokens[0][1:]
    return tokens[:max_tokens]


def answer_text(prompt: str, seed: int = 0, *, max_tokens: int = 120) -> str:
    """The full answer the token stream for ``prompt`` and ``seed`` adds up to."""
    return "".join(answer_tokens(prompt, seed, max_tokens=max_tokens))


def paced_tokens(
    prompt: str,
    seed: int = 0,
    *,
    ttft_ms: float = 100.0,
    token_ms: float = 15.0,
    jitter: float = 0.33,
    max_tokens: int = 120,
) -> Iterator[Token]:
    """The answer's tokens with the pause to take before each.

    The first pause is the time to first token; later ones are ``token_ms`` jittered by
    ``±jitter`` (seeded, so a replay is identical).
    """
    texts, delays = paced_plan(
        prompt, seed, ttft_ms=ttft_ms, token_ms=token_ms, jitter=jitter, max_tokens=max_tokens
    )
    for index, text in enumerate(texts):
        yield Token(index, text, delays[index])


def paced_plan(
    prompt: str,
    seed: int = 0,
    *,
    ttft_ms: float = 100.0,
    token_ms: float = 15.0,
    jitter: float = 0.33,
    max_tokens: int = 120,
) -> tuple[list[str], list[float]]:
    """:func:`paced_tokens` as two lists: the texts, and the pause in seconds before each.

    What a paced producer that keeps its own clock needs, without an object per token.
    """
    rng = random.Random(f"pace\x00{seed}\x00{prompt}")
    texts = answer_tokens(prompt, seed, max_tokens=max_tokens)
    delays = []
    for index in range(len(texts)):
        jittered = token_ms * (1.0 + jitter * (2.0 * rng.random() - 1.0))
        delay = ttft_ms if index == 0 else jittered
        delays.append(max(delay, 0.0) / 1000.0)
    return texts, delays


def ticker_word(index: int) -> str:
    """The ``index``-th token of the never-ending ticker feed."""
    if index % 17 == 16:
        return _CJK[(index // 17) % len(_CJK)][index % 5]
    return " " + _ENGLISH[index % len(_ENGLISH)]
