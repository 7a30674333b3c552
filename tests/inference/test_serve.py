"""The OpenAI-compatible server, called through the official `openai` client: each answer's
tokens equal lima_core.inference.decode.generate run on data.encode.prompt_ids directly (greedy, and sampled
with the request's seed), plain and streamed; stop strings, usage, the error objects, and
concurrent requests decoded together. One tiny export, served in this process on a free port."""

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from helpers import ASSETS, run_entry

from lima_core.checkpoint.hf import load_pretrained, save_pretrained
from lima_core.data.encode import prompt_ids
from lima_core.data.formats import Conversation
from lima_core.data.tokenizer import Tokenizer
from lima_core.inference.decode import generate
from lima_core.inference.serve.api import create_app
from lima_core.inference.text import TextStream
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.serve import main, parse_args, server_config

NAME = "tiny-chat"
QUESTION = "How do I boil an egg so the yolk stays soft?"
EOT_QUESTION = "Why is the sky blue?"  # the fixture's model answers it up to an EOT
CONTEXT = 256


@dataclass
class Served:
    client: openai.OpenAI
    reference: Llama  # its own copy of the export, for lima_core.inference.decode.generate
    tokenizer: Tokenizer
    engine: object
    folder: Path
    app: object
    base_url: str


def end_answers_at_eot(model: Llama, tokenizer: Tokenizer):
    """Make the random model end some greedy answers with EOT (EOT_QUESTION's at the latest
    after 17 tokens): EOT's head row becomes a scaled copy of the row of a token that answer
    picks first at step 16, so EOT outscores that token (the prompt's EOTs put EOT under the
    repetition penalty of 1.2, hence the scale 1.25)."""
    answer = generate(model, prompt_ids(tokenizer, [EOT_QUESTION]), max_new_tokens=40, temperature=0)
    step = next(i for i in range(16, 40) if answer[i] not in answer[:i])
    with torch.no_grad():
        model.output.weight[tokenizer.eot_id] = 1.25 * model.output.weight[answer[step]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / NAME
    tok = Tokenizer(ASSETS / "tokenizer.model")
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=32, n_heads=4, ffn_dim=32, n_layers=1,
                                        max_seq_len=CONTEXT))
    model.init_weights(torch.Generator().manual_seed(0))
    end_answers_at_eot(model, tok)
    save_pretrained(model, folder, tokenizer=tok)
    tokenizer = Tokenizer(folder)
    app = create_app(load_pretrained(folder), tokenizer, model_name=NAME, max_batch=16)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    base_url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    yield Served(client, load_pretrained(folder), tokenizer, app.state.engine, folder, app, base_url)
    server.should_exit = True
    thread.join(timeout=30)


def reference_ids(s: Served, conversation, max_tokens: int, **settings) -> list[int]:
    """lima_core.inference.decode.generate on the training format of the conversation, stopping at EOT or EOS."""
    settings = {"temperature": 0, **settings}
    return generate(s.reference, prompt_ids(s.tokenizer, conversation), max_new_tokens=max_tokens,
                    stop_ids={s.tokenizer.eot_id, s.tokenizer.eos_id}, **settings)


def finish_of(s: Served, ids: list[int]) -> str:
    return "stop" if ids[-1] in (s.tokenizer.eot_id, s.tokenizer.eos_id) else "length"


def messages_of(conversation: Conversation) -> list[dict]:
    system = [] if conversation.system is None else [{"role": "system", "content": conversation.system}]
    return system + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(conversation.turns)]


CONVERSATIONS = {
    "one turn": Conversation([QUESTION]),
    "system": Conversation([QUESTION], system="You are a careful cook."),
    "three turns": Conversation(["Hi!", "Hello. What can I do for you?", QUESTION]),
    "ends at EOT": Conversation([EOT_QUESTION]),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_answer_is_generate_on_the_training_format(served, name):
    conversation = CONVERSATIONS[name]
    ids = reference_ids(served, conversation, 40)
    assert ids[-1] == served.tokenizer.eot_id or name != "ends at EOT"  # the fixture put an EOT there
    response = served.client.chat.completions.create(model=NAME, messages=messages_of(conversation), temperature=0,
                                                     max_tokens=40)
    assert response.object == "chat.completion" and response.model == NAME and response.id.startswith("chatcmpl-")
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == served.tokenizer.decode(ids)
    assert choice.finish_reason == finish_of(served, ids)
    prompt = len(prompt_ids(served.tokenizer, conversation))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        prompt, len(ids), prompt + len(ids))


def test_streamed_answer_equals_the_plain_one(served):
    conversation = CONVERSATIONS["system"]
    ids = reference_ids(served, conversation, 48)
    stream = served.client.chat.completions.create(model=NAME, messages=messages_of(conversation), temperature=0,
                                                   max_tokens=48, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)  # the client ends the stream at data: [DONE]
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in with_choice]
    assert finishes == [None] * (len(with_choice) - 1) + [finish_of(served, ids)]
    deltas = [c.choices[0].delta.content for c in with_choice if c.choices[0].delta.content]
    assert len(deltas) > 10 and "".join(deltas) == served.tokenizer.decode(ids)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids(served.tokenizer, conversation))
    unasked = served.client.chat.completions.create(model=NAME, messages=messages_of(conversation), temperature=0,
                                                    max_tokens=48, stream=True)
    assert all(c.usage is None for c in unasked)


def spanning_stop(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, str, int]:
    """A stop string of four characters, the last two of one token's text and the first two of
    the next's, at its first occurrence in the answer; the text before it and the number of
    tokens up to the one that completes it."""
    text = tokenizer.decode(ids)
    ends = [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]  # text after k tokens
    for i in range(len(ids) - 1):
        a, b, c = ends[i:i + 3]
        stop = text[b - 2:b + 2]
        if b - a >= 2 and c - b >= 2 and stop.isprintable() and text.find(stop) == b - 2 and \
                all(text.startswith(tokenizer.decode(ids[:k])) for k in (i + 1, i + 2)):
            return stop, text[:b - 2], i + 2
    raise AssertionError("no two neighbouring tokens of two characters each")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text_and_never_streams(served, stream):
    ids = reference_ids(served, [QUESTION], 48)
    stop, before, completed_by = spanning_stop(served.tokenizer, ids)
    request = dict(model=NAME, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=48,
                   stop=["never in this text", stop])
    if not stream:
        response = served.client.chat.completions.create(**request)
        assert response.choices[0].message.content == before
        assert response.choices[0].finish_reason == "stop"
        assert response.usage.completion_tokens == completed_by
        return
    chunks = list(served.client.chat.completions.create(**request, stream=True,
                                                        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == before  # nothing of the stop string went out, in any chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == completed_by


def test_seeded_sampling_is_generate_with_that_seed(served):
    settings = dict(temperature=0.9, top_p=0.95, repetition_penalty=1.1)
    ids = reference_ids(served, [QUESTION], 32, generator=torch.Generator().manual_seed(1234), **settings)
    request = dict(model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, seed=1234,
                   temperature=0.9, top_p=0.95, extra_body={"repetition_penalty": 1.1})
    first = served.client.chat.completions.create(**request).choices[0].message.content
    assert first == served.tokenizer.decode(ids)
    assert served.client.chat.completions.create(**request).choices[0].message.content == first
    greedy = served.tokenizer.decode(reference_ids(served, [QUESTION], 32, repetition_penalty=1.1))
    assert first != greedy  # it did sample


def test_defaults_are_limas_sampling(served):
    """No settings: LIMA's temperature 0.7, top_p 0.9, penalty 1.2 (the reference's defaults)."""
    ids = reference_ids(served, [QUESTION], 24, temperature=0.7, generator=torch.Generator().manual_seed(7))
    response = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                                     max_tokens=24, seed=7)
    assert response.choices[0].message.content == served.tokenizer.decode(ids)


def test_answers_end_at_the_context(served):
    """max_tokens past the context: the answer stops at the context's end, with "length"."""
    long_question = " ".join(["egg"] * 110)
    prompt = len(prompt_ids(served.tokenizer, [long_question]))
    assert CONTEXT - 60 < prompt < CONTEXT - 5
    response = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": long_question}],
                                                     temperature=0, max_tokens=1000)
    ids = reference_ids(served, [long_question], 1000)
    assert len(ids) == CONTEXT - prompt and response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content == served.tokenizer.decode(ids)
    assert response.usage.completion_tokens == CONTEXT - prompt


def test_concurrent_requests_are_decoded_together(served):
    """Eight clients at once, with different prompts, lengths and penalties: each answer is its
    own greedy reference, and the engine decoded more than one row in a step."""
    questions = [f"{QUESTION} Question {i}: {'please ' * i}tell me." for i in range(8)]
    settings = [dict(max_tokens=24 + 7 * i, penalty=(1.2, 1.0)[i % 2]) for i in range(8)]
    expected = [served.tokenizer.decode(reference_ids(served, [q], s["max_tokens"], repetition_penalty=s["penalty"]))
                for q, s in zip(questions, settings)]
    start, answers = threading.Barrier(8), [None] * 8

    def ask(i: int):
        start.wait()
        answers[i] = served.client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": questions[i]}], temperature=0,
            max_tokens=settings[i]["max_tokens"], extra_body={"repetition_penalty": settings[i]["penalty"]},
        ).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == expected
    assert served.engine.largest_batch > 1


def test_models_lists_the_one_served(served):
    listed = served.client.models.list()
    assert [m.id for m in listed.data] == [NAME] and listed.data[0].object == "model"
    assert served.client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as e:
        served.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and NAME in e.value.message


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello."}
SYSTEM = {"role": "system", "content": "Be brief."}
# name: (request fields, words the message holds, param)
BAD_REQUESTS = {
    "no messages": (dict(messages=[]), "messages must not be empty", "messages"),
    "assistant first": (dict(messages=[ASSISTANT, USER]), "messages[0] has role 'assistant'", "messages.0.role"),
    "two user turns": (dict(messages=[USER, USER]), "messages[1] has role 'user' where 'assistant'", "messages.1.role"),
    "a late system turn": (dict(messages=[USER, ASSISTANT, SYSTEM, USER]), "only the first message may be a system",
                           "messages.2.role"),
    "system only": (dict(messages=[SYSTEM]), "the last message must be the user's", "messages"),
    "ends with the assistant": (dict(messages=[USER, ASSISTANT]), "the last message must be the user's", "messages"),
    "a tool role": (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "Input should be",
                    "messages.0.role"),
    "negative temperature": (dict(temperature=-0.1), "greater than or equal to 0", "temperature"),
    "temperature as text": (dict(temperature="0.7"), "valid number", "temperature"),
    "top_p 0": (dict(top_p=0), "greater than 0", "top_p"),
    "top_p above 1": (dict(top_p=1.5), "less than or equal to 1", "top_p"),
    "max_tokens 0": (dict(max_tokens=0), "greater than or equal to 1", "max_tokens"),
    "n 2": (dict(n=2), "only n = 1", "n"),
    "penalty 0": (dict(extra_body={"repetition_penalty": 0}), "greater than 0", "repetition_penalty"),
    "an empty stop string": (dict(stop=["", "x"]), "must not be empty", "stop"),
    "an unsupported field": (dict(logprobs=True), "unsupported parameter 'logprobs'", "logprobs"),
    "a negative seed": (dict(seed=-1), "greater than or equal to 0", "seed"),
    "stream_options alone": (dict(stream_options={"include_usage": True}), "only allowed with stream",
                             "stream_options"),
    "a prompt past the context": (dict(messages=[{"role": "user", "content": "egg " * 300}]), "context is 256",
                                  "messages"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error(served, name):
    fields, words, param = BAD_REQUESTS[name]
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(**{"model": NAME, "messages": [USER], **fields})
    assert e.value.status_code == 400
    assert words in e.value.message and e.value.param == param
    assert e.value.body["type"] == "invalid_request_error"
    if name == "a prompt past the context":
        assert e.value.code == "context_length_exceeded"


def post(served: Served, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(served.base_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize("body, words", [
    (b'{"model": "tiny-chat", "messages": [', "not valid JSON"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', "finite number"),
    (b'[1, 2]', "valid dictionary"),
    (b'{"messages": [{"role": "user", "content": "Hi"}]}', "model: Field required"),
])
def test_bodies_the_client_would_not_send_get_openai_errors(served, body, words):
    """Raw HTTP: FastAPI's 422s come back as OpenAI's 400 error object."""
    status, answer = post(served, "/chat/completions", body)
    assert status == 400 and set(answer) == {"error"}
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_unknown_path_gets_an_openai_404(served):
    status, answer = post(served, "/completions", b"{}")
    assert status == 404 and answer["error"]["code"] == "not_found"


def test_binds_this_machine_only_by_default(served):
    config = server_config(served.app, parse_args(["--checkpoint", str(served.folder)]))
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert parse_args(["--checkpoint", str(served.folder)]).model_name == NAME


def test_a_missing_checkpoint_is_one_line(tmp_path):
    outcome = run_entry(main, ["--checkpoint", str(tmp_path / "none")], tmp_path)
    assert outcome.status == 2 and outcome.err.startswith("error: ") and outcome.err.count("\n") == 1


TEXT = "héllo ’ 日本語 🙂 and sóme more wörds; ok"


@pytest.mark.parametrize("stop", [[], ["日本"], ["o ’"], ["🙂 a", "nd"], ["wö", "héllo"], ["never"], ["ok", "lo ’ 日"]])
def test_text_stream_releases_what_decoding_the_whole_gives(stop):
    """Token by token (byte tokens split the characters), the released pieces join to the text
    tokenizer.decode gives, cut before the first stop string; no piece holds a broken character."""
    tokenizer = Tokenizer(ASSETS / "tokenizer.model")
    ids = tokenizer.encode(TEXT)
    whole = tokenizer.decode(ids)
    assert whole == TEXT and any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # byte tokens are in it
    cut = min([whole.find(s) for s in stop if s in whole], default=len(whole))
    text, pieces = TextStream(tokenizer, stop), []
    for token in ids:
        pieces.append(text.add(token))
        if text.stopped:
            break
    pieces.append(text.flush())
    assert "".join(pieces) == whole[:cut] and text.stopped == (cut < len(whole))
    assert not any("\ufffd" in p for p in pieces)
