"""Build hook: the request hot path is compiled with mypyc (part of mypy) into C extensions.

The same modules stay importable as plain Python: set INCREMENTER_PURE_PYTHON=1 at install time
to skip the compiler (no C compiler needed then; the service's own code then costs ~60% more
CPU per request: docs/operations.md).
Everything else about the package is declared in pyproject.toml.
"""

import os

from setuptools import setup

# The modules every POST /increment (and /increments) runs through, from the socket to the WAL
# and the buffer; the other routes (reads, readiness, pages) stay plain Python.
# Not ingest/validate.py: mypyc drops the class keywords of msgspec.Struct subclasses
# (forbid_unknown_fields), which test_bad_input_rejected_and_changes_nothing catches.
HOT_PATH = [
    "src/incrementer/api/handler.py",
    "src/incrementer/api/increments.py",
    "src/incrementer/api/routes.py",
    "src/incrementer/auth/keyring.py",
    "src/incrementer/delivery/durability.py",
    "src/incrementer/http/pipeline.py",
    "src/incrementer/http/protocol.py",
    "src/incrementer/http/reader.py",
    "src/incrementer/http/request.py",
    "src/incrementer/http/responses.py",
    "src/incrementer/ingest/buffer.py",
    "src/incrementer/ingest/idempotency.py",  # POST /increments with an Idempotency-Key
    "src/incrementer/ingest/intake.py",
    "src/incrementer/ingest/sequence.py",
    "src/incrementer/ingest/wal.py",
    "src/incrementer/metrics.py",
]

if os.environ.get("INCREMENTER_PURE_PYTHON") == "1":
    ext_modules = []
else:
    from mypyc.build import mypycify

    ext_modules = mypycify(HOT_PATH, opt_level="3", group_name="incrementer")

setup(ext_modules=ext_modules)
