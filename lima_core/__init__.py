"""lima-core: fine-tune LLaMA-family models the LIMA way, numerically equal to transformers.

    import lima_core
    model = lima_core.load_pretrained("/ckpt/llama-2-7b-hf", dtype=torch.bfloat16, device="cuda")
    ids = lima_core.generate(model, prompt_ids, max_new_tokens=256)
    lima_core.save_pretrained(model, "out/", tokenizer=lima_core.Tokenizer("/ckpt/llama-2-7b-hf"))
"""

from lima_core.checkpoint.hf import load_pretrained, save_pretrained
from lima_core.config import TrainConfig
from lima_core.data.tokenizer import Tokenizer
from lima_core.inference.decode import generate
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig

__all__ = ["Llama", "ModelConfig", "TrainConfig", "Tokenizer", "generate", "load_pretrained", "save_pretrained"]
