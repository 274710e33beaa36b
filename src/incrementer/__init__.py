"""incrementer: coalesce a flood of counter increments into exactly-once database flushes."""

__version__ = "0.1.0"
