"""The one prompt-token counting rule the twin, the router and the load generator share.

A real engine counts tokens with its tokenizer; here every party must agree without one. The rule:

- a completion prompt that is a string counts its whitespace-separated words (``str.split()``);
- a prompt that is a list of integers is a token-id prompt and counts its length;
- a chat request counts the words of every message's text content (strings, or the ``text`` of content
  parts of type ``text``), with no template overhead.

Generated text is one word per token (each preceded by a space), so re-counting an output with the same
rule gives its completion-token count.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had one "
    "their its new after but who not they have first two been also other all into more time can year world may "
    "would over such when most some only city these then"
)
WORDS = tuple(_VOCABULARY.split())


class PromptError(ValueError):
    """A prompt or message list the counting rule cannot read; the message names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def count_prompt(prompt: Any) -> int:
    """Tokens of a completions ``prompt``: words of a string, length of a token-id list, or of a one-element batch."""
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return count_prompt(prompt[0])
    if isinstance(prompt, list) and len(prompt) > 1:
        raise PromptError("batched prompts (a list of several prompts) are not supported; send one prompt", "prompt")
    raise PromptError("prompt must be a non-empty string or a list of token ids", "prompt")


def count_messages(messages: Any) -> int:
    """Tokens of a chat ``messages`` list: words of every message's text content."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list of {role, content} objects", "messages")
    total = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise PromptError(f"messages[{index}] must be an object with a role", "messages")
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
        elif content is not None:
            raise PromptError(f"messages[{index}].content must be a string or a list of content parts", "messages")
    return total


def make_prompt(tokens: int, seed: int = 0) -> str:
    """A prompt of exactly ``tokens`` tokens under the rule (words drawn with ``seed``), for load generators."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def output_tokens(seed: int, request_id: int) -> Iterator[str]:
    """A request's output text token by token (" word"), deterministic in (seed, request id)."""
    rng = random.Random(f"{seed}:{request_id}")
    while True:
        yield " " + rng.choice(WORDS)


def prompt_tokens_of(body: dict[str, Any], chat: bool) -> list[Any]:
    """The prompt's tokens under the rule (words, or ids), in order: what prefix hashes are computed over."""
    if chat:
        words: list[Any] = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                words.extend(content.split())
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                        words.extend(part["text"].split())
        return words
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    return prompt.split() if isinstance(prompt, str) else list(prompt or [])


def prefix_hashes(tokens: list[Any], segment_tokens: int) -> tuple[int, ...]:
    """One hash per segment of ``segment_tokens`` tokens (the last may be partial), each chained on the ones
    before, so equal hashes mean equal prefixes: the ids the simulator's prefix cache and cache-aware
    routers match (Mooncake's ``hash_ids`` are such ids for 512-token blocks)."""
    out, previous = [], b""
    for start in range(0, len(tokens), segment_tokens):
        segment = tokens[start : start + segment_tokens]
        digest = hashlib.blake2b(previous + "\x1f".join(map(str, segment)).encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "big") >> 1)  # non-negative, fits an int64
        previous = digest
    return tuple(out)


def hashed_prompt(hash_ids: tuple[int, ...], prompt_tokens: int, segment_tokens: int, seed: int) -> list[int]:
    """A token-id prompt of ``prompt_tokens`` tokens whose segments are drawn from ``hash_ids`` (one per
    segment, the rest from ``seed``), so requests that share leading hash ids share a prompt prefix and
    :func:`prefix_hashes` gives them equal leading hashes: how a load generator replays prefix structure."""
    tokens: list[int] = []
    for hash_id in hash_ids:
        if len(tokens) >= prompt_tokens:
            break
        rng = random.Random(f"segment:{hash_id}")
        tokens.extend(rng.randrange(1, 32_000) for _ in range(min(segment_tokens, prompt_tokens - len(tokens))))
    rng = random.Random(f"tail:{seed}")
    tokens.extend(rng.randrange(1, 32_000) for _ in range(prompt_tokens - len(tokens)))
    return tokens
