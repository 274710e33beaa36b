"""What every benchmark script stands on: the servers under load (targets), wrk (load), one
measured run (measure), /metrics (metrics), PostgreSQL (database), CPU and memory from /proc
(procfs), the machine's tools and facts (machine, preflight). Import the modules themselves."""
