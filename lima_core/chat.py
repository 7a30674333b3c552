"""`python -m lima_core.chat`: talk with a checkpoint (lima_core.inference.chat)."""

from lima_core.inference.chat import main

if __name__ == "__main__":
    main()
