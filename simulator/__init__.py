"""A discrete-event model of vLLM V1 engine instances. It knows nothing of QLM."""


def build() -> str:
    """"compiled" when the engine imported is mypyc's build of it (setup.py's QLMCTL_COMPILE), else "pure"."""
    from simulator import engine

    return "pure" if engine.__file__.endswith(".py") else "compiled"
