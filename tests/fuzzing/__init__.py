"""What the fuzz tests (test_fuzz_bodies.py, test_fuzz_streams.py) draw on; no tests here.

- oracle: the reference, written from the README and openapi.json and never from the server's
  code: what answer a body must get, and what a whole answer to a byte stream looks like.
- bodies: hypothesis strategies for POST /increment bodies and their Content-Types.
- streams: hypothesis strategies for raw byte streams: mutated requests, framing edge cases.
- harness: the shared hypothesis settings, the key prefix, and blocking clients (hypothesis
  runs in a worker thread while the service runs on the test's event loop).
"""
