"""`python -m lima_core.serve`: the OpenAI-compatible server (lima_core.inference.serve)."""

from lima_core.inference.serve.cli import main

if __name__ == "__main__":
    main()
