"""Training on many ranks, applied to the pure model from outside: the hand-written FSDP (fsdp),
activation checkpointing (checkpointing), LLaMA's units and the order they are applied in
(parallelize), the process groups (distributed) and the memory and time planner (plan).
"""
