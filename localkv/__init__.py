"""localkv: local LLM inference with a compressed KV cache inside a patched llama.cpp.

    from localkv import Engine
    with Engine(policy="ahakv", budget=384) as eng:
        print(eng.generate("Summarise ...", max_tokens=128).text)

The API objects load lazily: importing them checks that llama_cpp is the
localkv-patched build (LocalkvError names the fix otherwise), while
`python -m localkv.build` works before that build exists.
"""
__version__ = "0.1.0"

import os as _os

# llama.cpp's CPU threads come from OpenMP, whose idle workers spin between graphs by default. While the
# host works between two graphs (a compression reading statistics, sampling) that spin holds a core, and
# beside any other busy process it costs the compute itself: measured in the README (statistics
# overhead). Read once by libgomp when llama.cpp loads; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Engine", "GenerationResult", "MemoryReport", "LocalkvError"]

from .errors import LocalkvError


def __getattr__(name):
    if name in ("Engine", "GenerationResult", "MemoryReport"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
