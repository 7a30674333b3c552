"""One decode core, the same tokens as before: the three paths that generate (batched generation,
the server's continuous batching through the official `openai` client, and `eval generate` from
a checkpoint) give, token for token and character for character, what the three separate decode
loops of commit 7c2028f gave on the same prompts, greedy and with seeded sampling.

golden/decode_7c2028f.json was recorded at that commit by golden/capture_at_7c2028f.py, on the
tiny test model (helpers.TINY, a 256-position context, the bundled tokenizer) drawn from seed 0,
plain and with answers ending at EOT (so both the budget and the stop token end rows).
"""

import json
import threading
from pathlib import Path

import openai
import pytest
import torch
from helpers import ASSETS, TINY, serving

from lima_core.checkpoint.hf import load_pretrained, save_pretrained
from lima_core.data.encode import prompt_ids
from lima_core.data.formats import Conversation
from lima_core.data.tokenizer import Tokenizer
from lima_core.eval.generate import Prompt, checkpoint_answerer, prompt_id
from lima_core.inference.decode import generate_batch
from lima_core.inference.serve.api import create_app
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig

GOLDEN = json.loads((Path(__file__).parent / "golden" / "decode_7c2028f.json").read_text())
PROMPTS = GOLDEN["prompts"]
VARIANTS = ("plain", "eot")


def cases(path: str, variant: str) -> dict[str, dict]:
    return {c["name"]: c for c in GOLDEN["cases"] if c["path"] == path and c["variant"] == variant}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The recorded model, plain and with the EOT rule, saved as the recording saved it."""
    tokenizer = Tokenizer(ASSETS / "tokenizer.model")
    cfg = ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                         "eos_id": tokenizer.eos_id, "max_seq_len": 256})
    assert GOLDEN["model"]["config"] == {**cfg.__dict__, "rope_scaling": None}
    folders = {}
    for variant in VARIANTS:
        model = Llama(cfg)
        model.init_weights(torch.Generator().manual_seed(0))
        model.set_residual_dropout(0.0)
        rule = GOLDEN["model"]["variants"][variant]
        if rule["end_answers_at_eot"]:
            with torch.no_grad():
                model.output.weight[tokenizer.eot_id] = rule["eot_row_scale"] * \
                    model.output.weight[rule["eot_row_source_token"]]
        folders[variant] = tmp_path_factory.mktemp("golden") / GOLDEN["model"]["folder_names"][variant]
        save_pretrained(model, folders[variant], tokenizer=tokenizer)
    return folders


def sampling_of(settings: dict) -> dict:
    return {k: settings[k] for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_generation_gives_the_recorded_tokens(checkpoints, variant):
    model, tokenizer = load_pretrained(checkpoints[variant]), Tokenizer(checkpoints[variant])
    prompts = [prompt_ids(tokenizer, Conversation(p["turns"], p["system"])) for p in PROMPTS]
    assert prompts == GOLDEN["prompt_ids"]
    for name, case in cases("generate_batch", variant).items():
        settings = case["settings"]

        def generate(rows):
            seed = settings["generator_seed"]
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            return generate_batch(model, rows, stop_ids=set(settings["stop_ids"]), generator=generator,
                                  **sampling_of(settings))

        got = [generate([p])[0] for p in prompts] if name.endswith("alone") else generate(prompts)
        assert got == [r["ids"] for r in case["results"]], (variant, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_generate_gives_the_recorded_answers(checkpoints, variant):
    for name, case in cases("eval_generate", variant).items():
        settings = case["settings"]
        answer_batch = checkpoint_answerer(str(checkpoints[variant]), sampling_of(settings), settings["seed"], "cpu",
                                           torch.float32)
        prompts = [Prompt(prompt_id(p["system"], p["turns"]), p["turns"], p["system"], None, i + 1)
                   for i, p in enumerate(PROMPTS)]
        expected = [(r["text"], r["tokens"], r["finish"]) for r in case["results"]]
        assert answer_batch(prompts) == expected, (variant, name)


def messages(p: dict) -> list[dict]:
    system = [] if p["system"] is None else [{"role": "system", "content": p["system"]}]
    return system + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(p["turns"])]


def ask(client, model: str, p: dict, stream: bool, **request) -> dict:
    """The answer as the recording kept it: text, finish reason, tokens, and the streamed pieces."""
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages(p), **request)
        return {"text": response.choices[0].message.content, "finish_reason": response.choices[0].finish_reason,
                "completion_tokens": response.usage.completion_tokens, "prompt_tokens": response.usage.prompt_tokens}
    chunks = list(client.chat.completions.create(model=model, messages=messages(p), stream=True,
                                                 stream_options={"include_usage": True}, **request))
    with_choice = [c.choices[0] for c in chunks if c.choices]
    deltas = [c.delta.content for c in with_choice if c.delta.content]
    return {"text": "".join(deltas), "finish_reason": [c.finish_reason for c in with_choice if c.finish_reason][-1],
            "completion_tokens": chunks[-1].usage.completion_tokens, "deltas": deltas}


def request_of(settings: dict, prompt: int) -> dict:
    request = {k: settings[k] for k in ("temperature", "top_p", "max_tokens", "stop") if k in settings}
    if "seed" in settings:
        request["seed"] = settings["seed"] if isinstance(settings["seed"], int) else 1235 + prompt
    return request


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_server_gives_the_recorded_answers(checkpoints, variant):
    """Plain and streamed (the same pieces), with a stop string, and concurrent requests decoded
    together by continuous batching, each with its own seed."""
    folder = checkpoints[variant]
    app = create_app(load_pretrained(folder), Tokenizer(folder), model_name=folder.name, max_batch=16)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        for name, case in cases("server", variant).items():
            expected = case["results"]
            if name.startswith("concurrent"):
                got, barrier = [None] * len(PROMPTS), threading.Barrier(len(PROMPTS))

                def worker(i, settings=case["settings"]):
                    barrier.wait()
                    got[i] = {"prompt": i, **ask(client, folder.name, PROMPTS[i], False, **request_of(settings, i))}

                threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=300)
            else:
                got = [{k: r[k] for k in ("prompt", "stream") if k in r} |
                       ask(client, folder.name, PROMPTS[r["prompt"]], r.get("stream", case["settings"].get("stream")),
                           **request_of(case["settings"], r["prompt"])) for r in expected]
            assert got == expected, (variant, name)
        assert app.state.engine.largest_batch > 1  # the concurrent requests were decoded together
