"""A model as a judge: LIMA's pairwise question (section 4), asked in both orders, and its 1-6
helpfulness grade (section 5), every answer one row of the SQLite store (store.py).

The templates are constants; their sha256 goes into every row, so a changed template is a new
cache key, never a silent mix. Replies are parsed strictly: the last non-empty line must be the
only verdict line of the reply, exactly `Verdict: A`, `Verdict: B` or `Verdict: Neither` (a
grade: `Grade: N`, N from 1 to 6), surrounding spaces aside. Anything else is retried (with the
HTTP errors a retry can cure, see client.py) and, when every attempt fails to parse, stored as
`unparsed`, which the report counts apart: it is never a tie. Only the last attempt's reply is
stored, with the number of attempts.

Each pair of responses is shown both ways, system_a's first ("AB") and system_b's first ("BA"),
and the verdict is stored un-swapped (store.py). Two orders that disagree count as a tie in the
aggregate (report.item_outcome), and how often they agree is the judge's position consistency.
"""

from __future__ import annotations

import hashlib
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm import tqdm

from lima_core.eval import store
from lima_core.eval.client import complete
from lima_core.eval.generate import EvalError, read_responses
from lima_core.eval.store import Response

# lima-core's wording of the three-way question LIMA asked people and GPT-4 (section 4): which
# answer is better for the person who asked, or neither is significantly better; the closing
# instruction makes the verdict machine-readable.
PAIRWISE_TEMPLATE = """\
You are judging two answers to the same question. Put yourself in the place of the person \
who asked it: which of the two answers would serve you better?

[Question]
{question}
[End of question]

[Answer A]
{answer_a}
[End of answer A]

[Answer B]
{answer_b}
[End of answer B]

Comparing these two answers, which answer is better?
- Answer A is significantly better.
- Answer B is significantly better.
- Neither is significantly better.

You may explain your reasoning first. Then end your reply with one line that is exactly one of:
Verdict: A
Verdict: B
Verdict: Neither
"""

# After LIMA section 5 (helpfulness of each response on a 1-6 scale, graded by a model).
LIKERT_TEMPLATE = """\
Evaluate how helpful the answer below is to the person who asked the question, on a scale \
from 1 to 6:
1: useless, wrong or off topic;
2: mostly unhelpful: major errors or omissions;
3: partly helpful, with significant problems;
4: helpful, with minor problems;
5: very helpful: correct and complete;
6: excellent: correct, complete, and as clear and well written as an expert's answer.

[Question]
{question}
[End of question]

[Answer]
{answer}
[End of answer]

You may explain your reasoning first. Then end your reply with one line that is exactly \
"Grade: N", N being 1, 2, 3, 4, 5 or 6.
"""


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


PAIRWISE_HASH = template_hash(PAIRWISE_TEMPLATE)
LIKERT_HASH = template_hash(LIKERT_TEMPLATE)

VERDICT_LINE = re.compile(r"Verdict: (A|B|Neither)")
GRADE_LINE = re.compile(r"Grade: ([1-6])")


def _final_line(reply: str, pattern: re.Pattern) -> re.Match | None:
    """The match of the reply's last non-empty line, when it is the reply's only line matching
    `pattern` (a reply that gives two verdicts gives none)."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    matches = [pattern.fullmatch(line) for line in lines]
    if not lines or matches[-1] is None or sum(m is not None for m in matches) != 1:
        return None
    return matches[-1]


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "Neither" as the reply shows them (the order shown), or None."""
    match = _final_line(reply, VERDICT_LINE)
    return match.group(1) if match else None


def parse_grade(reply: str) -> int | None:
    match = _final_line(reply, GRADE_LINE)
    return int(match.group(1)) if match else None


def unswapped(shown: str | None, order: str) -> str:
    """The verdict in terms of system_a and system_b from the one the judge gave of what it saw
    ("A" is whatever was shown first)."""
    if shown is None:
        return "unparsed"
    if shown == "Neither":
        return "tie"
    return shown if order == "AB" else {"A": "B", "B": "A"}[shown]


def render_question(prompt: dict) -> str:
    """The conversation a response answers, as the judge sees it: a single question as it is,
    else every turn labelled."""
    turns, system = prompt["turns"], prompt.get("system")
    if system is None and len(turns) == 1:
        return turns[0]
    lines = [] if system is None else [f"System: {system}"]
    return "\n\n".join(lines + [f"{('User', 'Assistant')[i % 2]}: {t}" for i, t in enumerate(turns)])


def pairwise_prompt(prompt: dict, first: str, second: str) -> str:
    return PAIRWISE_TEMPLATE.format(question=render_question(prompt), answer_a=first, answer_b=second)


def likert_prompt(prompt: dict, answer: str) -> str:
    return LIKERT_TEMPLATE.format(question=render_question(prompt), answer=answer)


# ---- responses from files --------------------------------------------------------------------

def responses_of(path) -> dict[tuple[str, int], Response]:
    """A response file's responses by (prompt id, sample); the file must hold one system's."""
    records = read_responses(path)
    systems = sorted({r["system"] for r in records})
    if len(systems) != 1:
        raise EvalError(f"{path}: holds the responses of {len(systems)} systems ({', '.join(systems)}); "
                        "give one system's responses a file")
    return {(r["id"], r["sample"]): Response(r["system"], r["id"], r["sample"],
                                             {"system": r.get("system_prompt"), "turns": r["prompt"]}, r["response"])
            for r in records}


def pair_up(a: dict, b: dict, names: tuple[str, str]) -> list[tuple[Response, Response]]:
    """The responses of A and B to the same (prompt, sample), in A's order."""
    pairs = [(a[k], b[k]) for k in a if k in b]
    if not pairs:
        raise EvalError(f"{names[0]} and {names[1]} share no (prompt id, sample): were they generated from the "
                        "same prompts?")
    first, second = next(iter(a.values())).system, next(iter(b.values())).system
    if first == second:
        raise EvalError(f"{names[0]} and {names[1]} are both system {first!r}; name them apart "
                        "(eval generate --system NAME)")
    for name, side, other in ((names[0], a, b), (names[1], b, a)):
        missing = sum(k not in other for k in side)
        if missing:
            print(f"warning: {missing} responses of {name} have no counterpart in the other file; not judged",
                  file=sys.stderr)
    return pairs


# ---- asking ----------------------------------------------------------------------------------

@dataclass
class Judge:
    """A judge model behind an OpenAI-compatible endpoint and how it is asked."""

    client: object  # openai.OpenAI
    model: str
    retries: int = 4
    base_delay: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 1024
    workers: int = 4

    def ask(self, text: str, parse):
        return complete(self.client, self.model, [{"role": "user", "content": text}], retries=self.retries,
                        base_delay=self.base_delay, parse=parse, temperature=self.temperature,
                        max_tokens=self.max_tokens)

    def run(self, tasks: list[tuple[object, str]], parse, desc: str):
        """Ask every (key, text) task, `workers` at a time; yields (key, Completion) as each is
        answered. An endpoint that fails stops the rest (what was answered is already stored)."""
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            futures = {pool.submit(self.ask, text, parse): key for key, text in tasks}
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="request"):
                    yield futures[future], future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def judge_pairs(conn, judge: Judge, pairs: list[tuple[Response, Response]], orders=("AB", "BA")) -> dict:
    """Ask the judge about each pair in each order, unless the store has that judgment already.
    Returns counts: asked, cached, and the new rows' verdicts."""
    tasks, cached = [], 0
    for a, b in pairs:
        hash_a, hash_b = store.add_response(conn, a), store.add_response(conn, b)
        for order in orders:
            key = {"prompt_id": a.prompt_id, "sample": a.sample, "system_a": a.system, "system_b": b.system,
                   "response_a": hash_a, "response_b": hash_b, "order_shown": order, "rater": judge.model,
                   "template_hash": PAIRWISE_HASH}
            if store.has_judgment(conn, key):
                cached += 1
                continue
            first, second = (a, b) if order == "AB" else (b, a)
            tasks.append((key, pairwise_prompt(a.prompt, first.response, second.response)))
    counts = {"asked": len(tasks), "cached": cached, "A": 0, "B": 0, "tie": 0, "unparsed": 0}
    for key, reply in judge.run(tasks, parse_verdict, desc=f"judge ({judge.model})"):
        verdict = unswapped(reply.parsed, key["order_shown"])
        store.add_judgment(conn, {**key, "rater_kind": "model", "raw_reply": reply.text, "verdict": verdict,
                                  "attempts": reply.attempts, "latency_s": reply.latency_s})
        counts[verdict] += 1
    return counts


def grade_responses(conn, judge: Judge, responses: list[Response]) -> dict:
    """The 1-6 grade of each response, unless stored already. Returns counts."""
    tasks, cached = [], 0
    for r in responses:
        key = {"prompt_id": r.prompt_id, "sample": r.sample, "system": r.system,
               "response": store.add_response(conn, r), "rater": judge.model, "template_hash": LIKERT_HASH}
        if store.has_grade(conn, key):
            cached += 1
            continue
        tasks.append((key, likert_prompt(r.prompt, r.response)))
    counts = {"asked": len(tasks), "cached": cached, "unparsed": 0}
    for key, reply in judge.run(tasks, parse_grade, desc=f"likert ({judge.model})"):
        store.add_grade(conn, {**key, "rater_kind": "model", "raw_reply": reply.text, "grade": reply.parsed,
                               "attempts": reply.attempts, "latency_s": reply.latency_s})
        counts["unparsed"] += reply.parsed is None
    return counts

