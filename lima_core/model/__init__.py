"""The model: LLaMA shapes and presets (shapes), the model in plain PyTorch (llama), attention
over packed rows (attention), which implementation each fused op uses (dispatch), the KV cache
(kv_cache) and the rank-count-independent initialisation of a sharded preset (initialization).
"""
