"""`ftlab estimate`: memory per device and throughput of a config, before a job is queued."""
