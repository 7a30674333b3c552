"""An export carries what vLLM reads to serve it (docs/serving.md, "With vLLM"): an HF config
naming LlamaForCausalLM, the safetensors files and, when there are several, an index that maps
every tensor to a file that exists; the tokenizer with lima-core's chat template; and a
generation config whose stop ids include EOT and whose sampling is the run's (what
`--generation-config auto` turns into vLLM's defaults). The template and the stops are checked
against transformers, which vLLM uses to read them."""

import json

import torch
from helpers import ASSETS, TINY
from safetensors import safe_open

from lima_core.checkpoint.hf import hf_key, save_pretrained
from lima_core.config import SamplingConfig
from lima_core.data.encode import prompt_ids
from lima_core.data.formats import Conversation
from lima_core.data.tokenizer import Tokenizer
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig


def test_a_sharded_export_holds_what_vllm_reads(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = Tokenizer(ASSETS / "tokenizer.model")
    model = Llama(ModelConfig(**{**TINY, "vocab_size": tokenizer.vocab_size}))
    model.init_weights(torch.Generator().manual_seed(0))
    sampling = SamplingConfig(temperature=0.5, top_p=0.8, repetition_penalty=1.1, max_new_tokens=300)
    export = tmp_path / "epoch-7"
    save_pretrained(model, export, tokenizer, dtype=torch.bfloat16, sampling=sampling, max_shard_bytes=64 * 1024)

    config = AutoConfig.from_pretrained(export)
    assert config.architectures == ["LlamaForCausalLM"] and config.model_type == "llama"
    assert config.num_attention_heads == TINY["n_heads"] and config.num_key_value_heads == TINY["n_kv_heads"]

    index = json.loads((export / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1, "the small shard size should give several files"
    stored = {}
    for name in files:
        with safe_open(export / name, "pt") as f:
            stored.update(dict.fromkeys(f.keys(), name))
    assert stored == index["weight_map"]  # every tensor in the file the index names, and nothing else
    assert set(stored) == {hf_key(name) for name, _ in model.named_parameters()}  # the whole model
    assert not list(export.glob("*.bin")) and not list(export.glob("*.pt"))  # nothing vLLM would unpickle

    generation = GenerationConfig.from_pretrained(export)
    assert set(generation.eos_token_id) == {tokenizer.eos_id, tokenizer.eot_id}
    assert (generation.temperature, generation.top_p, generation.repetition_penalty, generation.max_new_tokens) \
        == (0.5, 0.8, 1.1, 300)

    theirs = AutoTokenizer.from_pretrained(export)
    conversation = Conversation(["How do I boil an egg?", "Gently.", "For how long?"], "Be brief.")
    messages = [{"role": "system", "content": conversation.system}] + \
        [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(conversation.turns)]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    rendered = rendered["input_ids"] if "input_ids" in rendered else rendered  # a BatchEncoding in transformers 5
    assert list(rendered) == prompt_ids(tokenizer, conversation)
