"""localkv: local LLM inference with a compressed KV cache inside a patched llama.cpp.

    from localkv import Engine
    with Engine(policy="ahakv", budget=384) as eng:
        print(eng.generate("Summarise ...", max_tokens=128).text)

The API objects load lazily: importing them checks that llama_cpp is the
localkv-patched build (LocalkvError names the fix otherwise), while
`python -m localkv.build` works before that build exists.
"""
__version__ = "0.1.0"

__all__ = ["Engine", "GenerationResult", "MemoryReport", "LocalkvError"]

from .errors import LocalkvError


def __getattr__(name):
    if name in ("Engine", "GenerationResult", "MemoryReport"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
