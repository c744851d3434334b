import os

import pytest

# llama.cpp threads: the CI machine has 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def model_path():
    """The default model, assembled from its packages (the install step does this once)."""
    from localkv import models
    return str(models.resolve(None, progress=False))


def make_engine(model_path, **kw):
    from localkv.engine import Engine
    kw.setdefault("threads", 2)
    return Engine(model_path, **kw)


def raw_decode(eng, tokens, logits=False):
    """Decode tokens straight into a compressed engine's cache, growing its slots first (no compression)."""
    if eng.compressing:
        eng._make_room(len(tokens), "prefill")
    eng._decode(tokens, logits)
