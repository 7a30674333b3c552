"""The text of an answer as its tokens arrive, cut before the first stop string. Streaming never
releases a character of a stop string, and the text released equals decoding the whole answer.
"""

from __future__ import annotations

# ---- the text of an answer as its tokens arrive ---------------------------------------------


class TextStream:
    """An answer's text as its tokens arrive, cut before the first stop string.

    Each new token's text is the difference of two decodings of a short window (from the token
    before the last released text onward), with and without the new tokens, so a piece's leading
    space (sentencepiece's word boundary) comes out as decoding the whole answer gives it, at a
    constant cost per token. A window that ends in U+FFFD ends inside a UTF-8 character (byte
    tokens): it waits for the character's other bytes. Text that could be the start of a stop
    string is held back until the next tokens settle it, so no part of one is ever released."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.start = self.end = 0  # the window is ids[start:]; ids[start:end] are already in text
        self.text = ""  # the answer so far, cut before a stop string once one appears
        self.sent = 0  # characters of text released
        self.stopped = False  # a stop string appeared

    def add(self, token: int) -> str:
        """Take the next token (not EOT/EOS); return the text it releases, often ""."""
        self.ids.append(token)
        window = self.tokenizer.decode(self.ids[self.start:])
        if window.endswith("\ufffd"):
            return ""
        self._extend(window)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the answer's end (an unfinished character as U+FFFD, as decode gives it)."""
        if self.stopped:
            return ""
        if self.end < len(self.ids):
            self._extend(self.tokenizer.decode(self.ids[self.start:]))
        return self._release(final=True)

    def _extend(self, window: str):
        self.text += window[len(self.tokenizer.decode(self.ids[self.start:self.end])):]
        self.start, self.end = self.end, len(self.ids)

    def _release(self, final: bool) -> str:
        cut = min((i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped, end = self.text[:cut], True, cut
        else:
            end = len(self.text) - (0 if final else self._held())
        released, self.sent = self.text[self.sent:end], end
        return released

    def _held(self) -> int:
        """Length of the longest unreleased tail that is a proper prefix of a stop string."""
        tail = self.text[self.sent:]
        return max((k for s in self.stop for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])),
                   default=0)
