"""Generation with LIMA's sampling settings by default (lima_core.config.SamplingConfig: nucleus
p 0.9, temperature 0.7, repetition penalty 1.2), a KV cache, and a stop at EOT. Temperature 0 is
greedy decoding.

Prompts are decoded together as one batch: shorter prompts are padded on the left (padding is
hidden from attention and from the repetition penalty, and positions restart at each prompt's
first token), and each row stops on its own. On a sharded model every decode step gathers each
unit once for the whole batch; with a process group, every rank decodes its own prompts until
every rank is done (the forward holds collectives, so all ranks must run the same steps).

Exported as `lima_core.generate`; the command line is `python -m lima_core.chat`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lima_core.inference.sampling import LIMA, apply_repetition_penalty, check_settings, sample_next
from lima_core.model.kv_cache import KVCache
from lima_core.model.llama import Llama


@torch.no_grad()
def generate_batch(model: Llama, prompts: list[list[int]], *, max_new_tokens: int = LIMA.max_new_tokens,
                   temperature: float = LIMA.temperature, top_p: float = LIMA.top_p,
                   repetition_penalty: float = LIMA.repetition_penalty, stop_ids=(), generator=None,
                   group=None) -> list[list[int]]:
    """Continue each prompt (token ids); returns each row's new ids, its stop token included if
    reached, at most max_new_tokens and never past the model's context. With `group`, a
    collective: ranks may hold different numbers of prompts (even none)."""
    check_settings(max_new_tokens, temperature, top_p, repetition_penalty)
    context = model.cfg.max_seq_len
    for p in prompts:
        if len(p) >= context:
            raise ValueError(f"a prompt of {len(p)} tokens: beyond the model's context ({context} positions)")
    was_training = model.training
    model.eval()
    rows = prompts or [[0]]  # a rank without prompts still runs every step's collectives
    b, longest = len(rows), max(len(p) for p in rows)
    max_new_tokens = min(max_new_tokens, context - longest)
    cache, logits, seen = prefill(model, rows, max_new_tokens)
    device = logits.device
    lengths = torch.tensor([len(p) for p in rows], device=device)  # [b]
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    new = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample_next(apply_repetition_penalty(logits.float(), seen, repetition_penalty), temperature,
                            top_p, generator)  # [b]
        new = torch.cat([new, token[:, None]], dim=1)
        seen[torch.arange(b, device=device), token] = True
        done |= torch.isin(token, stops)
        if step + 1 == max_new_tokens or not _anyone_decoding(done, group):
            break
        logits = model(token[:, None], positions=(lengths + step)[:, None], cache=cache)[:, -1]
    model.train(was_training)
    return [_until_stop(row, set(stop_ids)) for row in new.tolist()][:len(prompts)]


def prefill(model: Llama, prompts: list[list[int]], free_slots: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """The prompts through the model together, shorter ones padded on the left (padding hidden
    from attention and from the repetition penalty, positions restarting at each prompt's first
    token), into a cache with `free_slots` slots after the longest prompt. Returns the cache,
    each row's next-token logits [b, vocab] and the tokens each row has seen [b, vocab] bool."""
    weight = model.tok_embeddings.weight
    device = weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # [b] left padding
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)  # [b, longest]
    slots = torch.arange(longest + free_slots, device=device)
    padding = slots[None, :] < pad[:, None] if any(len(p) < longest for p in prompts) else None
    cache = KVCache(model.cfg, b, longest + free_slots, device, weight.dtype, padding=padding)
    seen = torch.zeros(b, model.cfg.vocab_size, dtype=torch.bool, device=device)  # for the penalty
    for i, p in enumerate(prompts):
        seen[i, p] = True
    positions = (slots[None, :longest] - pad[:, None]).clamp(min=0)  # [b, longest]
    logits = model(tokens, positions=positions, cache=cache)[:, -1]  # [b, vocab]
    return cache, logits, seen


def _anyone_decoding(done: torch.Tensor, group) -> bool:
    """Whether a row of this rank, or of any rank of `group`, has not stopped (one host sync)."""
    busy = (~done).any().to(torch.int32)
    if group is not None:
        dist.all_reduce(busy, op=dist.ReduceOp.MAX, group=group)
    return bool(busy)


def _until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i + 1]
    return ids


def generate(model: Llama, prompt: list[int], **settings) -> list[int]:
    """Continue one prompt; `settings` as generate_batch's."""
    return generate_batch(model, [prompt], **settings)[0]


def answers(model: Llama, tokenizer, conversations: list[list[str]], **settings) -> list[str]:
    """The assistant's reply to each conversation (each ends with a user turn), decoded as one batch."""
    from lima_core.data.encode import prompt_ids
    stop_ids = {tokenizer.eot_id, tokenizer.eos_id}
    ids = generate_batch(model, [prompt_ids(tokenizer, turns) for turns in conversations], stop_ids=stop_ids,
                         **settings)
    return [tokenizer.decode(row) for row in ids]


def answer(model: Llama, tokenizer, turns: list[str], **settings) -> str:
    """The assistant's reply to a conversation that ends with a user turn."""
    return answers(model, tokenizer, [turns], **settings)[0]
