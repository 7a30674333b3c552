"""A scripted OpenAI-compatible server for the evaluation tests: a real HTTP server on localhost
(the standard library's), answering `POST /v1/chat/completions` by rules on the text it is sent,
and counting every request.

Pairwise prompts (they hold "[Answer A]"), by markers in the two answers shown:
    [garbage]        a reply with no verdict line, always (unparsed after every retry);
    [flaky]          HTTP 500 the first time this exact prompt is sent, then the rule below;
    [unparsed-once]  a reply with no verdict line the first time, then the rule below;
    [first]          always prefers the answer shown first (inconsistent across orders);
    otherwise        prefers the answer with more "[good]" markers; on equal counts "Verdict: Neither",
                     or with `fallback="distinct-words"` the answer with more distinct words (Neither
                     within 10%): a rule that separates real, unmarked generations.
Likert prompts (they hold "[Answer]"): "[grade=N]" in the answer gives "Grade: N"; no marker, a
reply without a grade. Anything else is a generation request: "echo: <the last message>".
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAIR = re.compile(r"\[Answer A\]\n(.*)\n\[End of answer A\]\n\n\[Answer B\]\n(.*)\n\[End of answer B\]", re.S)
SINGLE = re.compile(r"\[Answer\]\n(.*)\n\[End of answer\]", re.S)


class ScriptedJudge:
    def __init__(self, fallback: str = "tie", port: int = 0):
        self.fallback = fallback
        self.calls = Counter()  # "pairwise", "likert", "generate", "total"
        self.seen = Counter()  # prompt text -> times received
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def reply(self, text: str) -> tuple[int, str, str]:
        """(HTTP status, reply text, kind) for a prompt."""
        with self.lock:
            self.seen[text] += 1
            first_time = self.seen[text] == 1
        pair = PAIR.search(text)
        if pair:
            first, second = pair.groups()
            both = first + second
            if "[garbage]" in both:
                return 200, "Both answers have their merits.", "pairwise"
            if "[flaky]" in both and first_time:
                return 500, "", "pairwise"
            if "[unparsed-once]" in both and first_time:
                return 200, "Hmm, let me think.\nAnswer A, maybe B.", "pairwise"
            if "[first]" in both:
                return 200, "The first one reads better.\nVerdict: A", "pairwise"
            a, b = first.count("[good]"), second.count("[good]")
            if a == b and self.fallback == "distinct-words":
                a, b = len(set(first.split())), len(set(second.split()))
                a, b = (a, b) if abs(a - b) > 0.1 * max(a, b, 1) else (0, 0)
            verdict = "A" if a > b else "B" if b > a else "Neither"
            return 200, f"Comparing the two.\nVerdict: {verdict}", "pairwise"
        single = SINGLE.search(text)
        if single:
            grade = re.search(r"\[grade=(\d)\]", single.group(1))
            return 200, f"A fair answer.\nGrade: {grade.group(1)}" if grade else "Quite good.", "likert"
        return 200, f"echo: {text}", "generate"

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                status, text, kind = judge.reply(body["messages"][-1]["content"])
                with judge.lock:
                    judge.calls["total"] += 1
                    judge.calls[kind] += 1
                if status != 200:
                    return self._send(status, {"error": {"message": "scripted failure", "type": "server_error"}})
                words = len(text.split())
                self._send(200, {"id": "scripted", "object": "chat.completion", "created": int(time.time()),
                                 "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": 1 + words}})

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


if __name__ == "__main__":  # python tests/eval/scripted_judge.py --port 8100 [--fallback distinct-words]
    import argparse

    ap = argparse.ArgumentParser(description="a scripted OpenAI-compatible judge on 127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--fallback", choices=["tie", "distinct-words"], default="distinct-words")
    a = ap.parse_args()
    judge = ScriptedJudge(a.fallback, a.port)
    print(f"scripted judge at {judge.url}", flush=True)
    judge.server.serve_forever()
