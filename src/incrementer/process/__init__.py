"""Process models above the service: `supervisor` runs `serve --workers N` (spawn, reap,
restart, signal fan-out; nothing about requests), `worker` is one worker's entry point,
`member` its place in the group, `metrics_files` and `rundir` what the group shares, and
`sharedport` the port they all listen on. Nothing is imported here on purpose."""
