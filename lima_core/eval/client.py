"""Models behind an OpenAI-compatible endpoint (`POST /v1/chat/completions`), reached through the
official `openai` client only, so any server works: lima_core.serve, vLLM, OpenAI itself.

One request at a time per call, retried with exponential backoff (base_delay * 2**k seconds
before retry k + 1) on what a retry can cure: a refused or dropped connection, a timeout, HTTP
429 and 5xx; and, when the caller gives a parser, on a reply it cannot parse. Any other HTTP
error (400, 401, 404: a wrong model name or key) stops at once. The client's own retries are
off so every attempt is counted here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import openai


class EndpointError(RuntimeError):
    """An endpoint that failed every attempt, or refused the request; the message is one line."""


@dataclass
class Completion:
    """The last attempt's reply, what the parser made of it (None: unparsed, or no parser), the
    number of requests made, that attempt's latency, the completion tokens and finish reason
    the endpoint reports."""

    text: str
    parsed: object
    attempts: int
    latency_s: float
    tokens: int | None = None
    finish_reason: str | None = None


def make_client(url: str, api_key: str, timeout: float) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=api_key or "unused", timeout=timeout, max_retries=0)


def _retryable(error: openai.APIError) -> bool:
    if isinstance(error, (openai.APIConnectionError, openai.APITimeoutError)):
        return True
    status = getattr(error, "status_code", None)
    return status is None or status == 429 or status >= 500


def _describe(error: openai.APIError) -> str:
    status = getattr(error, "status_code", None)
    message = " ".join(str(getattr(error, "message", error)).split())[:200]
    return f"HTTP {status}: {message}" if status else message


def complete(client: openai.OpenAI, model: str, messages: list[dict], *, retries: int, base_delay: float,
             parse: Callable[[str], object] | None = None, sleep=time.sleep, **settings) -> Completion:
    """The model's reply to `messages`, at most 1 + `retries` requests (see the module doc).
    `settings`: create()'s keyword arguments (temperature, max_tokens, extra_body, ...)."""
    for attempt in range(retries + 1):
        last = attempt == retries
        start = time.perf_counter()
        try:
            reply = client.chat.completions.create(model=model, messages=messages, **settings)
        except openai.APIError as e:
            if not _retryable(e):
                raise EndpointError(f"{client.base_url}: the request was refused ({_describe(e)})") from None
            if last:
                raise EndpointError(f"{client.base_url}: no reply after {retries + 1} attempts "
                                    f"({_describe(e)})") from None
            sleep(base_delay * 2 ** attempt)
            continue
        latency = time.perf_counter() - start
        choice = reply.choices[0] if reply.choices else None
        text = (choice.message.content or "") if choice else ""
        tokens = reply.usage.completion_tokens if reply.usage is not None else None
        parsed = parse(text) if parse else None
        if parse is None or parsed is not None or last:
            return Completion(text, parsed, attempt + 1, latency, tokens, choice.finish_reason if choice else None)
        sleep(base_delay * 2 ** attempt)
    raise AssertionError("unreachable")
