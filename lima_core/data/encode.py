"""A conversation -> token ids and loss mask (LIMA section 2.3): BOS, then every utterance (the
system turn included) followed by EOT; the loss covers assistant tokens and their EOT only.
Examples longer than `max_len` are truncated; one that keeps no target is reported before training.
"""

from __future__ import annotations

from dataclasses import dataclass

from lima_core.data.formats import Conversation, DataError

IGNORE = -100


@dataclass
class Example:
    """One conversation as model input: ids [n] and next-token labels [n] (IGNORE where no loss)."""

    ids: list[int]
    labels: list[int]


def _utterances(conversation: Conversation | list[str]) -> list[tuple[str, bool]]:
    """(text, trained on) of each utterance in order: the system prompt, if any, then the turns.
    A plain list of turns is a conversation without a system prompt."""
    if isinstance(conversation, Conversation):
        system, turns = conversation.system, conversation.turns
    else:
        system, turns = None, conversation
    utterances = [] if system is None else [(system, False)]
    return utterances + [(turn, i % 2 == 1) for i, turn in enumerate(turns)]


def encode_conversation(tokenizer, conversation: Conversation | list[str], max_len: int) -> Example:
    """BOS, then every utterance followed by EOT; labels on assistant tokens and their EOT; truncated."""
    ids, trained = [tokenizer.bos_id], [False]
    for text, is_target in _utterances(conversation):
        piece = tokenizer.encode(text) + [tokenizer.eot_id]
        ids += piece
        trained += [is_target] * len(piece)
    # Position t predicts token t + 1: its label is that token when the token is trained on.
    labels = [nxt if keep else IGNORE for nxt, keep in zip(ids[1:], trained[1:])] + [IGNORE]
    return truncate(Example(ids, labels), max_len)


def truncate(example: Example, max_len: int) -> Example:
    """The example's first max_len tokens; the last of them predicts nothing."""
    if len(example.ids) <= max_len:
        return example
    return Example(example.ids[:max_len], example.labels[:max_len - 1] + [IGNORE])


def prompt_ids(tokenizer, conversation: Conversation | list[str]) -> list[int]:
    """The ids a model continues to answer the last user turn of `conversation` (an odd number of turns)."""
    ids = [tokenizer.bos_id]
    for text, _ in _utterances(conversation):
        ids += tokenizer.encode(text) + [tokenizer.eot_id]
    return ids


def has_target(example: Example) -> bool:
    return any(label != IGNORE for label in example.labels)


def check_targets(conversations: list[Conversation], examples: list[Example], max_len: int) -> str | None:
    """None when every example keeps a target token within max_len; else a one-line warning that
    says how many lose them all (their assistant turns start past max_len) and on which lines.
    Raises DataError when none keeps one: nothing to train on, or a dev loss of 0 / 0."""
    lost = [c for c, e in zip(conversations, examples, strict=True) if not has_target(e)]
    if not lost:
        return None
    file = lost[0].file
    if len(lost) == len(conversations):
        raise DataError(f"{file}: every conversation ({len(lost)}) starts its assistant turns past --max-len "
                        f"{max_len}: nothing to train on or measure (raise --max-len or shorten the prompts, "
                        f"from line {lost[0].line})")
    lines = ", ".join(str(c.line) for c in lost[:10]) + (", ..." if len(lost) > 10 else "")
    return (f"{file}: {len(lost)} of {len(conversations)} conversations have no assistant token within "
            f"--max-len {max_len} and are trained on nothing (lines {lines})")
