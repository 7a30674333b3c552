"""The planner: memory, bytes per link and time of lima-core's FSDP run of LIMA on a cluster of
GPU nodes, `python -m lima_core.plan`. One module a question, each reading the trainer's own unit
list (lima_core.parallel.parallelize) rather than a copy of it:

    memory    what a GPU holds: the train state, units in flight, activations, the decode copies
    cluster   the GPUs, their nodes and links: the levels a collective runs over
    traffic   the bytes of every collective, per phase, collective and level, as a run counts them
    timing    how long each part of the run takes, bound by its busiest resource
    run       the whole LIMA run on each layout, and whether it fits
    report    the printed plan and the layout it recommends
    cli       the flags and the command
"""
