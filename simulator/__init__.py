"""A discrete-event model of vLLM V1 engine instances. It knows nothing of QLM."""
