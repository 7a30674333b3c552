"""The trainer: the loop (loop, `python -m lima_core.train`), a run read and validated before any
write (prepare), what each epoch's end and the run's end do (end_of_epoch), the logs (metrics) and AdamW with
LIMA's schedule (optim).
"""
