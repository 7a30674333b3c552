"""The data side: JSONL formats -> conversations (formats), conversations -> ids and loss mask
(encode), examples -> packed rows (packing), the tokenizer with LIMA's EOT (tokenizer), and
`python -m lima_core.data stats` (describe).
"""
