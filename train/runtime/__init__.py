"""Where and how a run executes: the device mesh and its sharding rules, multi-host
start-up, checkpoints, metric logs and the XLA:CPU compiler options."""
