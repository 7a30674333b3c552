"""`python -m lima_core.plan`: the memory and time plan of a run (lima_core.parallel.planning)."""

from lima_core.parallel.planning.cli import main

if __name__ == "__main__":
    main()
