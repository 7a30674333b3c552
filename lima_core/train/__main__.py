"""`python -m lima_core.train` (and `torchrun ... -m lima_core.train`): fine-tune a LLaMA."""

from lima_core.train.loop import main

main()
