"""Generation with LIMA's sampling settings by default (lima_core.config.SamplingConfig: nucleus
p 0.9, temperature 0.7, repetition penalty 1.2), a KV cache, and a stop at EOT. Temperature 0 is
greedy decoding.

Exported as `lima_core.generate`; the command line is `python -m lima_core.chat`.
"""

from __future__ import annotations

import torch

from lima_core.config import SamplingConfig
from lima_core.data import prompt_ids
from lima_core.model import KVCache, Llama

LIMA = SamplingConfig()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers applies it): seen tokens' logits divided by the penalty
    when positive, multiplied when negative. logits [vocab], seen [n] token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    return logits.scatter(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """One token from logits [vocab]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
    drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
    sorted_probs[drop] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate(model: Llama, prompt: list[int], *, max_new_tokens: int = LIMA.max_new_tokens,
             temperature: float = LIMA.temperature, top_p: float = LIMA.top_p,
             repetition_penalty: float = LIMA.repetition_penalty, stop_ids=(), generator=None) -> list[int]:
    """Continue `prompt` (token ids); returns the new ids, the stop token included if reached."""
    was_training = model.training
    model.eval()
    weight = model.tok_embeddings.weight
    cache = KVCache(model.cfg, 1, len(prompt) + max_new_tokens, weight.device, weight.dtype)
    history = torch.tensor(prompt, device=weight.device)
    logits = model(history[None], cache=cache)[0, -1]  # [vocab]
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), history, repetition_penalty)
        token = sample_next(logits, temperature, top_p, generator)
        new.append(token)
        if token in stop_ids or len(new) == max_new_tokens:
            break
        history = torch.cat([history, history.new_tensor([token])])
        logits = model(history[-1:][None], cache=cache)[0, -1]
    model.train(was_training)
    return new


def answer(model: Llama, tokenizer, turns: list[str], **sampling) -> str:
    """The assistant's reply to a conversation that ends with a user turn."""
    ids = generate(model, prompt_ids(tokenizer, turns), stop_ids={tokenizer.eot_id, tokenizer.eos_id}, **sampling)
    return tokenizer.decode(ids)
