"""Training on many ranks, applied to the pure model from outside: where the ranks are and every
collective over them (topology), the hand-written FSDP, flat or two-level (fsdp), activation
checkpointing (checkpointing), LLaMA's units and the order they are applied in (parallelize),
the process groups (distributed), the node-local tensor-parallel copy that dev generation, the
server and eval generate decode with (decode_layout), and the memory, bytes and time planner (planning).
"""
