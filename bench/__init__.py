"""The benchmarks: incrementer against the HTTP ceiling (nginx), the Python floor and the naive
design, plus the narrower measurements that explain the numbers. Run each from the repository
root as a module:

    .venv/bin/python -m bench.run           # the benchmark and its report (docs/performance.md)
    .venv/bin/python -m bench.hotpath       # CPU per request of the request path, no sockets
    .venv/bin/python -m bench.flush         # PostgresStore.apply_batch of 100,000 keys alone
    .venv/bin/python -m bench.client        # the Python client beside wrk
    .venv/bin/python -m bench.sizing        # the figures docs/operations.md sizes a deployment by
    .venv/bin/python -m bench.spread        # how the kernel spreads connections over N processes
    .venv/bin/python -m bench.limits        # shared rate limits: accuracy, cost, revocation
    .venv/bin/python -m bench.profile_load  # py-spy on the service under wrk
    .venv/bin/python -m bench.soak          # 30 minutes at half the ceiling: memory, fds, p99, totals

Beneath the scripts, each package imports only those listed after it:

- report/: the tables, the markdown report, the plot, the scale-out sections;
- harness/: starting targets, loading them with wrk, measuring a run, the machine's facts;
- servers/: the comparison servers (lean, naive), started by the harness as modules.
"""
