"""Validation, the coalescing buffer and the write-ahead log: from a request to the flusher."""
