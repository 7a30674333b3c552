"""`torchrun --nproc_per_node 2 -m lima_core.serve`: two gloo ranks hold one tensor-parallel copy
of the tiny export (each read only its slices), rank 0 answers the official `openai` client and
leads the decoding, rank 1 follows it; the answers are one process's, greedy and seeded, and
concurrent requests are decoded together on both ranks."""

import os
import signal
import subprocess
import threading
import time
import urllib.request

import openai
import pytest
import torch
from helpers import ASSETS, ROOT, TINY, TORCHRUN, free_port

from lima_core.checkpoint.hf import load_pretrained, save_pretrained
from lima_core.data.encode import prompt_ids
from lima_core.data.formats import Conversation
from lima_core.data.tokenizer import Tokenizer
from lima_core.inference.decode import generate
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig

QUESTIONS = ["Hello", "Why is the sky blue?", "How do I boil an egg so the yolk stays soft?"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tokenizer = Tokenizer(ASSETS / "tokenizer.model")
    model = Llama(ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size, "max_seq_len": 256}))
    model.init_weights(torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("served") / "tiny"
    save_pretrained(model, path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def two_ranks(export):
    """The server on two ranks; yields an openai client of it."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    server = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "lima_core.serve",
                               "--checkpoint", str(export), "--port", str(port), "--device", "cpu"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.5)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def one_process(export, question: str, **settings) -> str:
    """The answer of one process holding the whole model (lima_core.inference.decode.generate)."""
    model, tokenizer = load_pretrained(export), Tokenizer(export)
    ids = generate(model, prompt_ids(tokenizer, Conversation([question], None)),
                   stop_ids={tokenizer.eot_id, tokenizer.eos_id}, **settings)
    return tokenizer.decode([t for t in ids if t not in (tokenizer.eot_id, tokenizer.eos_id)])


def ask(client, question: str, **request) -> str:
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **request)
    return reply.choices[0].message.content


def test_two_ranks_answer_greedy_as_one_process(export, two_ranks):
    for question in QUESTIONS:
        assert ask(two_ranks, question, temperature=0, max_tokens=24) == \
            one_process(export, question, temperature=0, max_new_tokens=24), question


def test_two_ranks_answer_seeded_as_one_process(export, two_ranks):
    """A seeded request draws from its own generator on both ranks, from logits equal on both."""
    question = QUESTIONS[1]
    served = ask(two_ranks, question, temperature=0.7, top_p=0.9, seed=7, max_tokens=24)
    assert served == one_process(export, question, temperature=0.7, top_p=0.9, max_new_tokens=24,
                                 generator=torch.Generator().manual_seed(7))


def test_concurrent_requests_on_two_ranks(export, two_ranks):
    """Requests joining and leaving a running batch: the follower admits and drops the same rows."""
    answers = [None] * len(QUESTIONS)

    def worker(i):
        answers[i] = ask(two_ranks, QUESTIONS[i], temperature=0, max_tokens=8 + 8 * i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == [one_process(export, q, temperature=0, max_new_tokens=8 + 8 * i)
                       for i, q in enumerate(QUESTIONS)]
