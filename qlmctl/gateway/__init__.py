"""The gateway (`qlmctl serve`): QLM in front of engine servers, as an OpenAI-compatible HTTP server.

Modules import their HTTP stack (uvicorn, prometheus_client) themselves; importing this package loads
nothing heavy.
"""
