"""The compressed cache with every layer on a GPU against the same runs on the CPU.

Skipped where llama.cpp was built without a GPU backend (LOCALKV_CUDA=1 ./install.sh builds CUDA's) or no
device is present. On the GPU the statistics are summed in another order, so a token whose score ties
with another's may go the other way: the kept sets must agree almost everywhere and greedy replies exactly.
"""
import numpy as np
import pytest

from conftest import make_engine
from localkv import capi

pytestmark = pytest.mark.model

PROMPT = ("The lighthouse keeper wrote in her log every night. " * 30 +
          "The code for the storeroom is amber-4471. What is the code for the storeroom?")


def _gpu_available() -> bool:
    return bool(capi.llama_cpp.llama_supports_gpu_offload())


@pytest.fixture(autouse=True)
def _needs_gpu():
    """Asked when a test runs, not on import: collecting this module needs no library."""
    if not _gpu_available():
        pytest.skip("llama.cpp was built without a GPU backend (or no GPU is present)")


@pytest.mark.parametrize("policy", ["snapkv", "ahakv", "h2o"])
@pytest.mark.parametrize("ctype", ["f16", "q8_0"])
def test_gpu_keeps_what_the_cpu_keeps(model_path, policy, ctype):
    runs = {}
    for where, layers in (("cpu", 0), ("gpu", -1)):
        with make_engine(model_path, policy=policy, budget=96, chunk=128, gpu_layers=layers, flash_attn=True,
                         cache_type_k=ctype, cache_type_v=ctype) as eng:
            res = eng.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
            kept = [capi.positions(eng.ctx, i, eng.shape.n_head_kv) for i in range(len(eng.kv_layers))]
            runs[where] = (res, kept)
    (cpu, kept_cpu), (gpu, kept_gpu) = runs["cpu"], runs["gpu"]
    assert gpu.compressions == cpu.compressions > 0
    same = [np.intersect1d(a[h], b[h]).size / max(a.shape[1], 1)
            for a, b in zip(kept_cpu, kept_gpu) for h in range(a.shape[0])]
    assert np.mean(same) >= 0.97 and min(same) >= 0.85
    assert gpu.text == cpu.text
    assert gpu.kv_bytes_allocated == cpu.kv_bytes_allocated   # the same slots, now in GPU memory
