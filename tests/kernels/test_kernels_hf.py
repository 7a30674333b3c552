"""The lima-kernels README's embedding example: its code block, run as written, swaps every LlamaRMSNorm of a
small random transformers LlamaForCausalLM for lima_kernels.RMSNorm, and the logits stay
those of the unmodified model."""

import copy
import re
from pathlib import Path

import torch

import lima_kernels

README = Path(__file__).parents[2] / "kernels" / "README.md"


def _readme_example() -> str:
    """The first python block of kernels/README.md's "In a transformers model" section (defines use_lima_rms_norm)."""
    section = README.read_text().split("\n## In a transformers model\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks and "def use_lima_rms_norm" in blocks[0], "kernels/README.md lost its transformers example"
    return blocks[0]


def test_readme_example_swaps_llama_rms_norm():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    namespace = {}
    exec(compile(_readme_example(), str(README), "exec"), namespace)
    use_lima_rms_norm = namespace["use_lima_rms_norm"]

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                         attn_implementation="eager")
    hf = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # norms start at one; random ones make the test see the copied weights
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    mine = use_lima_rms_norm(copy.deepcopy(hf))

    norms = [m for m in mine.modules() if isinstance(m, lima_kernels.RMSNorm)]
    assert len(norms) == 2 * config.num_hidden_layers + 1  # two per layer and the final norm
    assert not any(isinstance(m, LlamaRMSNorm) for m in mine.modules())
    assert all(m.variance_epsilon == config.rms_norm_eps for m in norms)

    tokens = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        want = hf(tokens).logits
        got = mine(tokens).logits
    # fp32 throughout; only the norms' sum order differs (a few fp32 ulps, through two layers).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
