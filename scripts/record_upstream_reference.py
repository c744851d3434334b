"""Record tests/data/upstream_reference.json from an UNPATCHED llama-cpp-python build.

    python -m venv /tmp/stock && /tmp/stock/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/stock/bin/python scripts/record_upstream_reference.py MODEL.gguf

(build the stock wheel with the same CMAKE_ARGS localkv.build uses: -DLLAVA_BUILD=OFF).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import upstream_ref  # noqa: E402

import llama_cpp  # noqa: E402

lib = llama_cpp.llama_cpp._lib
if hasattr(lib, "llama_localkv_abi_version"):
    sys.exit("this llama_cpp is the patched build: record the reference with a stock one")

ref = upstream_ref.run(sys.argv[1])
ref["llama_cpp_python"] = llama_cpp.__version__
ref["cpu"] = upstream_ref.cpu_signature()
out = Path(__file__).resolve().parent.parent / "tests" / "data" / "upstream_reference.json"
out.write_text(json.dumps(ref, indent=1))
print(f"wrote {out}: tokens {[s['token'] for s in ref['steps']]}")
