#!/usr/bin/env bash
# The GPU check, for the first session lent a GPU: one call of under 8 minutes, from the repository root.
#
# Prepared on the CPU machine (docs/development.md, "The GPU check"), in an ignored .whl/ that the call carries:
#   LOCALKV_CUDA=1 CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" python -m localkv.build wheel .whl   # the CUDA build
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf diskcache
# On the device (python3 there is 3.12 with numpy, typer, rich, pytest, jinja2):
#   scripts/gpu_check.sh            (what it prints, and $OUT/gpu_check.json, go into README.md)
#
# It installs the carried wheels, writes a random-weight Llama-3-8B-shaped model (4 layers, 32 query / 8 KV
# heads, head dim 128), runs tests/test_gpu.py on it (the GPU keeps what the CPU keeps, replies equal), then
# prints, for upstream's cache, uniform and ragged compressed ones: kernels per decoded token (bench graph) and
# decode tokens/s at 8K and 32K with every layer on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/localkv-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
python3 -c "from localkv.rpc import gpu_devices; assert gpu_devices(local=True), 'no GPU: this llama_cpp has no GPU backend, or the machine none'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

MODEL=$OUT/llama8b-shaped.gguf
python3 -c "from localkv.synthetic import write_random_model; write_random_model('$MODEL', 'llama')"

echo "== tests/test_gpu.py"
LOCALKV_GPU_MODEL=$MODEL timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -5

echo "== kernels per decoded token (bench graph, every layer on the GPU)"
python3 -m localkv.cli bench graph --model "$MODEL" --prompt 8192 --budget 1024 -ngl -1
python3 -m localkv.cli bench graph --model "$MODEL" --prompt 8192 --budget 1024 -ngl -1 --json > "$OUT/graph.json"

echo "== decode tokens/s at 8K and 32K"
timeout 240 python3 -m localkv.cli bench speed --model "$MODEL" --policies full,snapkv,snapkv:adaptive=true \
    --budgets 1024 --lengths 8192,32768 --decode 128 -ngl -1 --out "$OUT/speed" --markdown

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
speed = [json.loads(line) for line in (out / "speed" / "speed.jsonl").read_text().splitlines() if line.strip()]
summary = {"graph": json.loads((out / "graph.json").read_text()),
           "decode_tokens_per_s": {f"{r['config']['policy']}@{r['config']['length']}": r["result"]["decode_tokens_per_s"]
                                   for r in speed if "result" in r}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary["decode_tokens_per_s"], indent=1))
EOF
