"""The live path: qlmctl in front of real (or emulated) vLLM servers over HTTP.

Modules here import their HTTP stack (starlette, uvicorn, httpx) themselves; importing this package
loads nothing heavy.
"""
