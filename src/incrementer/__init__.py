"""incrementer: coalesce a flood of counter increments into exactly-once database flushes.

The package in layers, each importing only those below it (docs/design.md, "The tree"):
cli, process, service, api, delivery / auth / node, ingest, http / store, and the foundation
modules (config, logs, metrics, build, faults, urls). Run it with `incrementer serve`; its
parts are put together in service.py.
"""

__version__ = "0.1.0"
