"""The compressed cache with every layer on a GPU against the same runs on the CPU.

Skipped where llama.cpp was built without a GPU backend (LOCALKV_CUDA=1 ./install.sh builds CUDA's) or no
device is present. On the GPU the statistics are summed in another order, so a token whose score ties
with another's may go the other way: the kept sets must agree almost everywhere and greedy replies exactly.
"""
import os

import numpy as np
import pytest

from conftest import make_engine
from localkv import capi

pytestmark = pytest.mark.model

PROMPT = ("The lighthouse keeper wrote in her log every night. " * 30 +
          "The code for the storeroom is amber-4471. What is the code for the storeroom?")


def _gpu_available() -> bool:
    from localkv.rpc import gpu_devices
    return bool(gpu_devices(local=True))  # (llama_supports_gpu_offload is true with the RPC backend built)


@pytest.fixture(autouse=True)
def _needs_gpu():
    """Asked when a test runs, not on import: collecting this module needs no library."""
    if not _gpu_available():
        pytest.skip("llama.cpp was built without a GPU backend (or no GPU is present)")


@pytest.fixture
def gpu_model(request):
    """LOCALKV_GPU_MODEL (scripts/gpu_check.sh writes a random-weight model on the device, which has no registry),
    else the default model."""
    return os.environ.get("LOCALKV_GPU_MODEL") or request.getfixturevalue("model_path")


@pytest.mark.parametrize("policy,args", [("snapkv", None), ("snapkv", {"adaptive": "true"}), ("ahakv", None),
                                         ("h2o", None), ("kvzip", None)],
                         ids=["snapkv", "snapkv-ragged", "ahakv", "h2o", "kvzip-replay"])
@pytest.mark.parametrize("ctype", ["f16", "q8_0"])
def test_gpu_keeps_what_the_cpu_keeps(gpu_model, policy, args, ctype, monkeypatch):
    # a GPU layer's slots are a multiple of 256; the CPU run is padded alike, so both hold the same slots
    monkeypatch.setenv("LLAMA_LOCALKV_SLOT_PAD", "256")
    runs = {}
    for where, layers in (("cpu", 0), ("gpu", -1)):
        if where == "gpu":
            monkeypatch.delenv("LLAMA_LOCALKV_SLOT_PAD")
        with make_engine(gpu_model, policy=policy, policy_args=args, budget=96, chunk=128, gpu_layers=layers,
                         flash_attn=True, cache_type_k=ctype, cache_type_v=ctype) as eng:
            res = eng.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
            kept = [capi.positions(eng.ctx, i, eng.shape.n_head_kv) for i in range(len(eng.kv_layers))]
            alloc = capi.cache_state(eng.ctx)[1]
            runs[where] = (res, kept, alloc)
    (cpu, kept_cpu, alloc_cpu), (gpu, kept_gpu, alloc_gpu) = runs["cpu"], runs["gpu"]
    assert (alloc_gpu % 256 == 0).all()
    assert gpu.compressions == cpu.compressions > 0
    same = [np.intersect1d(a[h], b[h]).size / max(a.shape[1], 1)
            for a, b in zip(kept_cpu, kept_gpu) for h in range(a.shape[0])]
    assert np.mean(same) >= 0.97 and min(same) >= 0.85
    assert gpu.text == cpu.text
    assert gpu.kv_bytes_allocated == cpu.kv_bytes_allocated   # the same slots, now in GPU memory
