"""The emulator (`qlmctl emulate`): a vLLM-compatible server whose timing is the simulator's engine model.

It speaks vLLM's OpenAI API, /metrics and sleep mode (`EMULATOR_API.md`), so the gateway talks to it
through the vLLM engine kind unchanged, and the whole live path runs without a GPU.
"""
