"""Strategy comparison: pre-train, fine-tune for every N and seed, test, report."""
