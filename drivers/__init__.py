"""Hardware drivers: sans-I/O protocol cores and thin transports. Never imports agent."""
