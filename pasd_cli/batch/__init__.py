"""Running a command over a batch of inputs: finding them (`inputs.py`), planning jobs with their
outputs (`plan.py`), the runner that owns a command's lifecycle (`runner.py`, driving a
`command.Command`), one image through a command (`image_job.py`), the prompt pre-pass
(`prompt_pass.py`), failure memory, the lock, records and what the user sees (`report.py`)."""
