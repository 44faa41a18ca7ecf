"""Run tracking: the results record, W&B set-up and the end-of-run summary."""
