"""queuectl: a background job queue for shell commands whose store is an event ledger."""
