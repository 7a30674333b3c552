"""Responses to a prompt set, from a checkpoint decoded here or from an OpenAI-compatible
endpoint, one JSON line per (prompt, sample), resumable.

Prompts come one a line in the LIMA test format (`{"conversations": ["prompt"]}`) or any of the
conversation formats lima_core.data reads. A conversation that ends with a user turn is a
prompt; one that ends with an assistant turn is a prompt (everything before that turn) with a
reference answer. A prompt's id is a hash of its system prompt and turns, so it is the same in
every file made from the same prompts, whatever their order or format; a prompt repeated in the
file is asked once.

A response line: {"id", "sample", "system" (the name of the system under test), "prompt"
(turns, ending with the user's), "system_prompt", "reference", "response", "tokens" (the
tokens generated, a stop token not counted; from an endpoint, the usage count it reports, or
null), "finish" ("stop", or "length" for a reply cut at the token limit; an endpoint's
finish_reason), "settings" (sampling and seed)}.

Resuming: a rerun with the same --out generates only the (id, sample) pairs not in it. Each
line is appended with one write and flushed; a line cut short by a crash (the file's last, with
no newline) is cut off on the next run, and only it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from lima_core.data.formats import DataError, parse_conversations


class EvalError(ValueError):
    """Bad input to an evaluation command; the message is one line."""


@dataclass
class Prompt:
    id: str
    turns: list[str]  # user and assistant turns, ending with the user's
    system: str | None  # the conversation's system prompt
    reference: str | None  # the answer the data gives, if it gives one
    line: int


def prompt_id(system: str | None, turns: list[str]) -> str:
    """A stable id: the first 16 hex digits of the sha256 of the prompt's system prompt and turns."""
    text = json.dumps({"system": system, "turns": turns}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- reading prompts ------------------------------------------------------------------------

_PLACEHOLDER = "\x00lima-core: no answer\x00"
_ANSWER_TURN = {"string": _PLACEHOLDER, "role": {"role": "assistant", "content": _PLACEHOLDER},
                "from": {"from": "gpt", "value": _PLACEHOLDER}}


def _with_placeholder_answer(line: str, first: bool) -> str:
    """A prompt-only line (ending with a user turn) with a placeholder assistant turn added, so
    lima_core.data validates it as it validates training data. Any other line is returned as
    it is, for lima_core.data to accept or to name what is wrong with it."""
    def no_duplicates(pairs):
        if len({k for k, _ in pairs}) < len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    try:
        record = json.loads(line.removeprefix("\ufeff") if first else line, object_pairs_hook=no_duplicates)
        field = next(f for f in ("conversations", "messages") if f in record)
        turns = record[field]
        last = turns[-1]
    except Exception:  # not JSON, not an object, no turns, too deep: lima_core.data names it
        return line
    if isinstance(last, str) and all(isinstance(t, str) for t in turns):
        ends_with_user, kind = len(turns) % 2 == 1, "string"
    elif isinstance(last, dict) and last.get("role") == "user":
        ends_with_user, kind = True, "role"
    elif isinstance(last, dict) and last.get("from") in ("human", "user"):
        ends_with_user, kind = True, "from"
    else:
        return line
    if not ends_with_user:
        return line
    record[field] = [*turns, _ANSWER_TURN[kind]]
    return json.dumps(record)


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a file, in order, each asked once (see the module doc)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e.strerror or e}") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n")):
        try:
            lines.append(_with_placeholder_answer(raw.decode("utf-8"), first=number == 0).encode())
        except UnicodeDecodeError:
            lines.append(raw)  # lima_core.data names the byte and line
    try:
        conversations = parse_conversations(b"\n".join(lines), str(path))
    except DataError as e:
        raise EvalError(str(e)) from None
    prompts, seen = [], {}
    for c in conversations:
        reference = None if c.turns[-1] == _PLACEHOLDER else c.turns[-1]
        turns = c.turns[:-1]
        pid = prompt_id(c.system, turns)
        if pid in seen:
            print(f"warning: {path}:{c.line} repeats the prompt of line {seen[pid]}; it is asked once",
                  file=sys.stderr)
            continue
        seen[pid] = c.line
        prompts.append(Prompt(pid, turns, c.system, reference, c.line))
    return prompts


# ---- response files ----------------------------------------------------------------------

RESPONSE_FIELDS = {"id": str, "sample": int, "system": str, "prompt": list, "response": str}


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise EvalError(f"{where}: expected a JSON object (a response line)")
    for field, kind in RESPONSE_FIELDS.items():
        value = record.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EvalError(f"{where}: field {field!r} must be a {kind.__name__} (a response line: "
                            f"{', '.join(RESPONSE_FIELDS)})")
    if record["sample"] < 0 or not all(isinstance(t, str) for t in record["prompt"]):
        raise EvalError(f"{where}: 'sample' must be >= 0 and 'prompt' a list of strings")
    if not isinstance(record.get("system_prompt"), (str, type(None))):
        raise EvalError(f"{where}: 'system_prompt' must be a string or null")
    return record


def read_responses(path: str | Path, repair: bool = False) -> list[dict]:
    """The response lines of a file, validated. With `repair` (the file generate appends to), a
    last line cut short by a crash is removed from the file instead of being an error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: cannot read: {e.strerror or e}") from None
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:  # not UTF-8, or not JSON
            if repair and number == len(lines):  # the last line, with no newline: a write cut short
                print(f"warning: {path}:{number}: removing a partly written last line", file=sys.stderr)
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(raw))
                return records
            raise EvalError(f"{path}:{number}: not a JSON line") from None
        records.append(_check_record(record, f"{path}:{number}"))
    if repair and data and not data.endswith(b"\n"):
        with open(path, "ab") as f:  # a complete last line whose newline was not written
            f.write(b"\n")
    seen = set()
    for r in records:
        if (r["id"], r["sample"]) in seen:
            raise EvalError(f"{path}: prompt {r['id']} sample {r['sample']} appears twice")
        seen.add((r["id"], r["sample"]))
    return records


def append_line(file, record: dict) -> None:
    """One line, one write, flushed to disk: a crash leaves at most a partial last line."""
    file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    file.flush()
    os.fsync(file.fileno())


# ---- generating ------------------------------------------------------------------------

def system_name(checkpoint: str) -> str:
    """A checkpoint's default name: its folder's, with the run's for an epoch export (epoch-5 of
    runs/lima is lima/epoch-5: each run has an epoch-5)."""
    path = Path(checkpoint).resolve()
    return f"{path.parent.name}/{path.name}" if re.fullmatch(r"epoch-\d+", path.name) else path.name


def generate(prompts: list[Prompt], out: Path, system: str, samples: int, settings: dict, answer_batch,
             batch_size: int, group=None) -> int:
    """Append the missing (prompt, sample) responses to `out`, `answer_batch(list of Prompt)` ->
    [(text, tokens, finish reason)] answering up to `batch_size` prompts at a time. Returns how many it wrote.

    With `group` (the ranks of one tensor-parallel copy), every rank answers every batch in
    lockstep; rank 0 reads what is done, tells the others, and alone writes."""
    leader = group is None or dist.get_rank(group) == 0
    todo = _shared(group, lambda: _missing(prompts, out, system, samples, settings) if leader else None)
    if isinstance(todo, EvalError):
        raise todo
    with (open(out, "ab") if leader else nullcontext()) as file, \
            tqdm(total=len(todo), desc=f"generate {system}", unit="response", disable=not leader) as bar:
        for start in range(0, len(todo), batch_size):
            batch = [(prompts[i], sample) for i, sample in todo[start:start + batch_size]]
            for (p, sample), (text, tokens, finish) in zip(batch, answer_batch([p for p, _ in batch]), strict=True):
                if leader:
                    append_line(file, {"id": p.id, "sample": sample, "system": system, "prompt": p.turns,
                                       "system_prompt": p.system, "reference": p.reference, "response": text,
                                       "tokens": tokens, "finish": finish, "settings": settings})
                bar.update()
    return len(todo)


def _missing(prompts: list[Prompt], out: Path, system: str, samples: int, settings: dict):
    """(prompt index, sample) of each response `out` lacks, or the EvalError that says why it cannot be added to."""
    try:
        done = read_responses(out, repair=True) if out.exists() else []
        for record in done:
            if record["system"] != system or record.get("settings") != settings:
                raise EvalError(f"{out}: holds responses of system {record['system']!r} with settings "
                                f"{record.get('settings')}, not of {system!r} with {settings}; use another --out")
    except EvalError as e:
        return e
    have = {(r["id"], r["sample"]) for r in done}
    out.parent.mkdir(parents=True, exist_ok=True)
    return [(i, s) for s in range(samples) for i, p in enumerate(prompts) if (p.id, s) not in have]


def _shared(group, make):
    """make() on rank 0, its value on every rank of `group` (broadcast); make() alone without a group."""
    if group is None:
        return make()
    box = [make()]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def checkpoint_answerer(checkpoint: str, settings: dict, seed: int, device: str, dtype, ranks=None):
    """answer_batch for a checkpoint decoded here, a batch of prompts at a time, by the decode
    core; a reply's token count is the tokens generated (re-encoding the decoded text does not
    give it back), its stop token not counted. With `ranks` of several processes (torchrun on
    one node), each rank holds its tensor-parallel share, reading only its slices of the files,
    and every rank decodes the same batch with the same seed."""
    import torch

    from lima_core.checkpoint.hf import load_pretrained
    from lima_core.data.encode import prompt_ids
    from lima_core.data.formats import Conversation
    from lima_core.data.tokenizer import Tokenizer
    from lima_core.inference.decode import decode_batch
    from lima_core.parallel.decode_layout import load_tensor_parallel

    if ranks is not None and ranks.world > 1:
        if ranks.topology.nodes > 1:
            raise EvalError(f"eval generate --checkpoint runs on one node; these {ranks.world} ranks are "
                            f"{ranks.topology.nodes} nodes (torchrun --nproc_per_node N on one machine)")
        model, device = load_tensor_parallel(checkpoint, ranks.comm, dtype, ranks.device), ranks.device
    else:
        model = load_pretrained(checkpoint, dtype=dtype, device=device)
    tokenizer = Tokenizer(checkpoint)
    stop_ids = {tokenizer.eot_id, tokenizer.eos_id}
    generator = torch.Generator(device).manual_seed(seed)

    def answer_batch(prompts: list[Prompt]) -> list[tuple[str, int, str]]:
        rows = decode_batch(model, [prompt_ids(tokenizer, Conversation(p.turns, p.system)) for p in prompts],
                            stop_ids=stop_ids, generator=generator, **settings)
        return [(tokenizer.decode(row.tokens), len(row.tokens) - (row.finish == "stop"), row.finish) for row in rows]

    return answer_batch


def messages_of(turns: list[str], system: str | None) -> list[dict]:
    """A conversation as chat-completions messages."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def endpoint_answerer(client, model: str, settings: dict, retries: int, base_delay: float):
    """answer_batch for a model behind an OpenAI-compatible endpoint, one request a prompt. The
    repetition penalty is not an OpenAI parameter: it is sent in the body (vLLM and
    lima_core.serve read it) unless it is 1, which OpenAI's own API needs."""
    from lima_core.eval.client import complete

    request = dict(max_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                   top_p=settings["top_p"])
    if settings["repetition_penalty"] != 1:
        request["extra_body"] = {"repetition_penalty": settings["repetition_penalty"]}

    def answer_batch(prompts: list[Prompt]) -> list[tuple[str, int | None, str | None]]:
        replies = [complete(client, model, messages_of(p.turns, p.system), retries=retries, base_delay=base_delay,
                            **request) for p in prompts]
        return [(r.text, r.tokens, r.finish_reason) for r in replies]

    return answer_batch
