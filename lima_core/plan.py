"""`python -m lima_core.plan`: the memory and time plan of a run (lima_core.parallel.plan)."""

from lima_core.parallel.plan import main

if __name__ == "__main__":
    main()
