"""`python -m lima_core.data stats FILE.jsonl`: look at training data before training on it."""

from lima_core.data.describe import main

main()
