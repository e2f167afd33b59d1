"""Client tools: they talk to a server over HTTP and nothing else (replay, outcomes, the profiler's prober)."""
