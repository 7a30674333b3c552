"""Golden outputs of lima-core's three decoding paths at commit 7c2028f (before the one-decode-core
refactor): lima_core.sampling.generate_batch, the OpenAI-compatible server (lima_core.serve, asked
through the official `openai` client) and eval generate (lima_core.eval.generate.checkpoint_answerer).

    git worktree add /tmp/at-7c2028f 7c2028f && cd /tmp/at-7c2028f && make setup &&
        PYTHONPATH=tests .venv/bin/python /work/main/tests/inference/golden/capture_at_7c2028f.py OUT

writes OUT (default /tmp/golden/decode_golden.json). The model is rebuilt from the recipe recorded
in the JSON ("model"); a test after the refactor rebuilds it the same way, reruns every case and
compares ids / text / finish reasons / usage.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import threading
from pathlib import Path

import openai
import torch

from helpers import ASSETS, TINY, serving
from lima_core.config import ModelConfig
from lima_core.data import Conversation, prompt_ids
from lima_core.eval.generate import Prompt, checkpoint_answerer, prompt_id
from lima_core.hf import load_pretrained, save_pretrained
from lima_core.model import Llama
from lima_core.sampling import generate, generate_batch
from lima_core.serve import create_app
from lima_core.tokenizer import Tokenizer

import test_serve  # the served fixture's EOT helper (end_answers_at_eot) and spanning_stop

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/golden/decode_golden.json")
COMMIT = "7c2028f"
BUNDLED_TOKENIZER = ASSETS / "tokenizer.model"
CONTEXT = test_serve.CONTEXT  # 256: the served fixture's max_seq_len
MAX_NEW = 40
SEED = 1234
PENALTY = 1.2  # LIMA's; the server's default when a request sends none
GREEDY = dict(temperature=0.0, top_p=0.9, repetition_penalty=PENALTY, max_new_tokens=MAX_NEW)
SAMPLED = dict(temperature=0.7, top_p=0.9, repetition_penalty=PENALTY, max_new_tokens=MAX_NEW)

PROMPTS = [
    dict(turns=["Hello"], system=None),
    dict(turns=[test_serve.EOT_QUESTION], system=None),  # "Why is the sky blue?": the EOT variant stops on it
    dict(turns=["How do I boil an egg so the yolk stays soft?"], system="You are a careful cook."),
    dict(turns=["Hi!", "Hello. What can I do for you?",
                "Can you suggest a good book to read on a long train journey?"], system=None),
    dict(turns=["I have a small garden that gets sun only in the morning. Which vegetables would grow well there, "
                "and how often should I water them in summer?"], system=None),
    dict(turns=["My grandmother is turning ninety next month and the whole family wants to surprise her. She loves "
                "old films, gardening, and the seaside town where she grew up. We have a modest budget and about "
                "twenty relatives who live in different cities. Could you help us plan a party that feels personal, "
                "is easy to organise from far away, and will not tire her out too much?"], system=None),
]

# ---- the model -------------------------------------------------------------------------------


def model_config(tok: Tokenizer) -> ModelConfig:
    return ModelConfig(**{**TINY, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                          "max_seq_len": CONTEXT})


def build(tok: Tokenizer, eot: bool) -> tuple[Llama, dict]:
    """The tiny model; with `eot`, test_serve.end_answers_at_eot applied (some greedy answers end at EOT)."""
    model = Llama(model_config(tok))
    model.init_weights(torch.Generator().manual_seed(0))
    model.set_residual_dropout(0.0)
    info: dict = {"end_answers_at_eot": eot}
    if eot:
        # What the helper does, spelled out so the test can rebuild it without decoding: EOT's head
        # row becomes 1.25 x the row of the token the EOT question's greedy answer picks at `step`.
        answer = generate(model, prompt_ids(tok, [test_serve.EOT_QUESTION]), max_new_tokens=40, temperature=0)
        step = next(i for i in range(16, 40) if answer[i] not in answer[:i])
        source = answer[step]
        expected = 1.25 * model.output.weight[source].detach().clone()
        test_serve.end_answers_at_eot(model, tok)
        assert torch.equal(model.output.weight[tok.eot_id], expected), "end_answers_at_eot changed"
        info.update(eot_row_source_token=source, eot_row_scale=1.25, step=step,
                    rule="with torch.no_grad(): model.output.weight[tok.eot_id] = 1.25 * "
                         "model.output.weight[eot_row_source_token]  (test_serve.end_answers_at_eot)")
    return model, info


# ---- the cases ---------------------------------------------------------------------------------


def conversation(p: dict) -> Conversation:
    return Conversation(list(p["turns"]), p["system"])


def messages(p: dict) -> list[dict]:
    system = [] if p["system"] is None else [{"role": "system", "content": p["system"]}]
    return system + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(p["turns"])]


def finish_of(ids: list[int], stop_ids: set[int]) -> str:
    return "stop" if ids and ids[-1] in stop_ids else "length"


def generate_batch_cases(variant: str, model: Llama, tok: Tokenizer) -> list[dict]:
    stop_ids = {tok.eot_id, tok.eos_id}
    prompts = [prompt_ids(tok, conversation(p)) for p in PROMPTS]
    cases = []
    for mode, settings in (("greedy", GREEDY), ("seeded", SAMPLED)):
        def gen(rows):
            generator = torch.Generator().manual_seed(SEED) if mode == "seeded" else None
            return generate_batch(model, rows, stop_ids=stop_ids, generator=generator, **settings)

        def result(i, ids):
            return {"prompt": i, "ids": ids, "text": tok.decode(ids), "finish": finish_of(ids, stop_ids)}

        recorded = {**settings, "stop_ids": sorted(stop_ids), "generator_seed": SEED if mode == "seeded" else None}
        batch = gen(prompts)
        cases.append({"path": "generate_batch", "variant": variant, "name": f"{mode} batch",
                      "settings": {**recorded, "batch": "all prompts in one call, one generator for the call"},
                      "results": [result(i, ids) for i, ids in enumerate(batch)]})
        cases.append({"path": "generate_batch", "variant": variant, "name": f"{mode} alone",
                      "settings": {**recorded, "batch": "each prompt alone, a fresh generator for each call"},
                      "results": [result(i, gen([p])[0]) for i, p in enumerate(prompts)]})
    return cases


def stream_text(stream) -> tuple[str, str | None, int | None, list[str]]:
    chunks = list(stream)
    with_choice = [c for c in chunks if c.choices]
    deltas = [c.choices[0].delta.content for c in with_choice if c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in with_choice if c.choices[0].finish_reason]
    usage = chunks[-1].usage.completion_tokens if chunks and chunks[-1].usage is not None else None
    return "".join(deltas), (finish[-1] if finish else None), usage, deltas


def ask(client, name: str, p: dict, stream: bool, **request) -> dict:
    if stream:
        text, finish, tokens, deltas = stream_text(client.chat.completions.create(
            model=name, messages=messages(p), stream=True, stream_options={"include_usage": True}, **request))
        return {"text": text, "finish_reason": finish, "completion_tokens": tokens, "deltas": deltas}
    response = client.chat.completions.create(model=name, messages=messages(p), **request)
    return {"text": response.choices[0].message.content, "finish_reason": response.choices[0].finish_reason,
            "completion_tokens": response.usage.completion_tokens, "prompt_tokens": response.usage.prompt_tokens}


def spanning_stop_from(tokenizer: Tokenizer, ids: list[int], start: int) -> tuple[str, str, int]:
    """test_serve.spanning_stop's stop string (the last two characters of one token's text and the
    first two of the next's, at its first occurrence), looked for from token `start` on, so it cuts
    the answer in its middle; the text before it and the tokens up to the one that completes it."""
    text = tokenizer.decode(ids)
    ends = [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]
    for i in range(start, len(ids) - 1):
        a, b, c = ends[i:i + 3]
        stop = text[b - 2:b + 2]
        if b - a >= 2 and c - b >= 2 and stop.isprintable() and text.find(stop) == b - 2 and \
                all(text.startswith(tokenizer.decode(ids[:k])) for k in (i + 1, i + 2)):
            return stop, text[:b - 2], i + 2
    return test_serve.spanning_stop(tokenizer, ids)


def streamed_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text lima_core.serve.TextStream releases for these ids (no stop strings), a stop token not decoded."""
    from lima_core.serve import TextStream

    text, out = TextStream(tokenizer, []), ""
    for token in ids:
        if token in (tokenizer.eot_id, tokenizer.eos_id):
            break
        out += text.add(token)
    return out + text.flush()


def server_cases(variant: str, folder: Path, reference: dict[str, list[dict]], notes: list[str]) -> list[dict]:
    name = folder.name
    tok = Tokenizer(folder)  # as the served fixture: the checkpoint's tokenizer
    app = create_app(load_pretrained(folder), tok, model_name=name, max_batch=16)
    greedy = dict(temperature=0, max_tokens=MAX_NEW)
    seeded = dict(temperature=0.7, top_p=0.9, seed=SEED, max_tokens=MAX_NEW)
    served = {"model_name": name, "max_batch": 16, "repetition_penalty": "server default 1.2 (not sent)"}
    cases = []
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        for mode, request in (("greedy", greedy), ("seeded", seeded)):
            for stream in (False, True):
                results = [{"prompt": i, **ask(client, name, p, stream, **request)} for i, p in enumerate(PROMPTS)]
                cases.append({"path": "server", "variant": variant, "name": f"{mode} {'streamed' if stream else 'plain'}",
                              "settings": {**request, **served, "stream": stream}, "results": results})
                # cross-check: each answer is generate_batch on the prompt alone (same seed)
                # cross-check: each answer is generate_batch on the prompt alone (same seed), its text
                # what the server's TextStream makes of those ids
                for r, ref in zip(results, reference[f"{mode} alone"]):
                    if (r["text"], r["finish_reason"], r["completion_tokens"]) != (streamed_text(tok, ref["ids"]),
                                                                                   ref["finish"], len(ref["ids"])):
                        notes.append(f"{variant}: server {mode} stream={stream} prompt {r['prompt']} differs from "
                                     "generate_batch alone")
                    elif r["text"] != ref["text"]:
                        notes.append(f"{variant}: server {mode} stream={stream} prompt {r['prompt']}: same tokens as "
                                     "generate_batch alone, but the server's text (TextStream) is not "
                                     "tokenizer.decode(ids)")

        # a stop string that cuts the longest greedy answer in its middle (two characters of each of
        # two neighbouring tokens), after a stop string that never occurs
        refs = reference["greedy alone"]
        k = max(range(len(refs)), key=lambda i: len(refs[i]["ids"]))
        stop, before, completed_by = spanning_stop_from(tok, refs[k]["ids"], len(refs[k]["ids"]) // 2)
        request = dict(greedy, stop=["never in this text", stop])
        results = [{"prompt": k, "stream": s, **ask(client, name, PROMPTS[k], s, **request)} for s in (False, True)]
        for r in results:
            if (r["text"], r["finish_reason"], r["completion_tokens"]) != (before, "stop", completed_by):
                notes.append(f"{variant}: stop case stream={r['stream']} is not the cut greedy answer")
        cases.append({"path": "server", "variant": variant, "name": "greedy with a stop string",
                      "settings": {**request, **served, "expected_from_generate_batch": {
                          "text": before, "finish_reason": "stop", "completion_tokens": completed_by}},
                      "results": results})

        # concurrent requests (threads released together), each prompt its own seed
        seeds = [SEED + 1 + i for i in range(len(PROMPTS))]
        for mode in ("seeded", "greedy"):
            def req(i):
                return dict(seeded, seed=seeds[i]) if mode == "seeded" else dict(greedy)

            answers, barrier = [None] * len(PROMPTS), threading.Barrier(len(PROMPTS))

            def worker(i):
                barrier.wait()
                answers[i] = ask(client, name, PROMPTS[i], False, **req(i))

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
            app.state.engine.largest_batch = 0  # diagnostics only (timing-dependent, not recorded)
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            batched = app.state.engine.largest_batch
            print(f"{variant} concurrent {mode}: engine.largest_batch {batched}", file=sys.stderr)
            alone = [ask(client, name, p, False, **req(i)) for i, p in enumerate(PROMPTS)]
            for i, (a, b) in enumerate(zip(answers, alone)):
                if a != b:
                    notes.append(f"{variant}: concurrent {mode} prompt {i} differs from the same request alone")
            cases.append({"path": "server", "variant": variant, "name": f"concurrent {mode}",
                          "settings": {**(dict(seeded, seed=f"{SEED + 1} + prompt index") if mode == "seeded"
                                          else greedy), **served, "stream": False,
                                       "concurrency": f"{len(PROMPTS)} threads behind a barrier, one per prompt"},
                          "results": [{"prompt": i, **a} for i, a in enumerate(answers)]})
    return cases


def eval_cases(variant: str, folder: Path) -> list[dict]:
    cases = []
    for mode, settings in (("greedy", GREEDY), ("seeded", SAMPLED)):
        sampling = {k: settings[k] for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty")}
        answer_batch = checkpoint_answerer(str(folder), sampling, SEED, "cpu", torch.float32)
        items = [Prompt(prompt_id(p["system"], p["turns"]), list(p["turns"]), p["system"], None, i + 1)
                 for i, p in enumerate(PROMPTS)]
        out = answer_batch(items)
        cases.append({"path": "eval_generate", "variant": variant, "name": f"{mode} batch",
                      "settings": {**sampling, "seed": SEED, "device": "cpu", "dtype": "float32",
                                   "batch": "all prompts in one answer_batch call"},
                      "results": [{"prompt": i, "text": t, "tokens": n, "finish": f}
                                  for i, (t, n, f) in enumerate(out)]})
    return cases


def main():
    tok = Tokenizer(BUNDLED_TOKENIZER)
    cfg = model_config(tok)
    notes: list[str] = []
    variants = {}
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, eot in (("plain", False), ("eot", True)):
            model, info = build(tok, eot)
            folder = Path(tmp) / f"tiny-{variant}"
            save_pretrained(model, folder, tokenizer=tok)
            variants[variant] = info
            loaded = load_pretrained(folder)
            assert Tokenizer(folder).encode("Hello there, world!") == tok.encode("Hello there, world!")
            gb = generate_batch_cases(variant, loaded, tok)
            cases += gb
            reference = {c["name"]: c["results"] for c in gb}
            # batch vs alone (an observation recorded, not a requirement)
            for mode in ("greedy", "seeded"):
                same = [a["ids"] == b["ids"] for a, b in zip(reference[f"{mode} batch"], reference[f"{mode} alone"])]
                if mode == "greedy" and not all(same):
                    notes.append(f"{variant}: greedy batch differs from alone for prompts "
                                 f"{[i for i, s in enumerate(same) if not s]}")
            cases += server_cases(variant, folder, reference, notes)
            cases += eval_cases(variant, folder)
            ev = {c["name"]: c["results"] for c in cases if c["path"] == "eval_generate" and c["variant"] == variant}
            for mode in ("greedy", "seeded"):
                for e, r in zip(ev[f"{mode} batch"], reference[f"{mode} batch"]):
                    stop = r["finish"] == "stop"
                    if (e["text"], e["tokens"], e["finish"]) != (r["text"], len(r["ids"]) - stop, r["finish"]):
                        notes.append(f"{variant}: eval {mode} prompt {e['prompt']} differs from generate_batch batch")
    golden = {
        "commit": COMMIT,
        "model": {
            "tokenizer": "lima_core/assets/tokenizer.model (Tokenizer(BUNDLED_TOKENIZER))",
            "tokenizer_ids": {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                              "eot_id": tok.eot_id},
            "config": dataclasses.asdict(cfg),
            "config_recipe": "ModelConfig(**{**helpers.TINY, 'vocab_size': tok.vocab_size, 'bos_id': tok.bos_id, "
                             "'eos_id': tok.eos_id, 'max_seq_len': 256})  (256: test_serve.CONTEXT)",
            "build": "model = Llama(cfg)  (kernels='auto': torch on CPU); "
                     "model.init_weights(torch.Generator().manual_seed(0)); model.set_residual_dropout(0.0); "
                     "[variant 'eot' only: the eot rule below]; save_pretrained(model, folder, tokenizer=tok); "
                     "every case decodes load_pretrained(folder) (fp32, cpu); the server uses Tokenizer(folder)",
            "variants": variants,
            "folder_names": {"plain": "tiny-plain", "eot": "tiny-eot"},
            "device": "cpu", "dtype": "float32", "torch": torch.__version__,
        },
        "prompts": PROMPTS,
        "prompt_ids": [prompt_ids(tok, conversation(p)) for p in PROMPTS],
        "cases": cases,
        "cross_check_notes": notes,
    }
    OUT.write_text(json.dumps(golden, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases); notes: {notes or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
