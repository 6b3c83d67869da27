#!/usr/bin/env bash
# The GPU check (issue 25), in one call on a lent GPU machine: Python, nvcc and CMake there, no
# package registry, 16 cores, about 8 minutes.  Prepare here first:
#
#   bash scripts/gpu_bundle.sh 3.12      # wheels + trimmed llama-cpp-python source, ~30 MB
#
# then run `bash scripts/test_gpu.sh` there with .cache/gpu-bundle carried.  It
#   1. builds llama-cpp-python with CUDA and qes-edge (libqes + its CUDA plugin) for the GPU
#      found only (its compute capability), into a venv under /tmp;
#   2. runs libqes's C tests (every backend against portable, cuda among them) and
#      tests/test_backends.py, tests/test_placement.py with cuda available;
#   3. writes a small synthetic llama GGUF (models/synthetic.py), trains 3 steps with
#      --gpu-layers all, says where every trainable tensor lived, replays the ledger with the CPU
#      backend (every weights hash checked) and compares the heads, and follows the CPU run
#      with --gpu-layers all (the GGUF must be byte-equal);
#   4. times a step with and without offload and measures host RSS and GPU memory of training
#      against plain llama-cpp-python inference with the same offload.
# Everything it prints goes to $OUT/gpu_report.txt too (OUT: the device tool's folder, else /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
REPORT="$OUT/gpu_report.txt"
exec > >(tee "$REPORT") 2>&1
B=.cache/gpu-bundle
V=0.3.36
J=$(nproc)
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
fail() { say "FAILED: $*"; exit 1; }

[ -d "$B/wheels" ] || fail "$B/wheels is missing: run scripts/gpu_bundle.sh here first and carry $B"
command -v nvcc >/dev/null || fail "nvcc is not on PATH"
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .') || fail "nvidia-smi failed"
say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1), sm_$arch;" \
    "nvcc $(nvcc --version | grep -o 'release [0-9.]*'); $J cores; $(python3 --version)"

# -- 1. build --------------------------------------------------------------------------------------
VENV=/tmp/qes-gpu-venv
python3 -m venv "$VENV" || fail "python3 -m venv"
PIP=("$VENV/bin/python" -m pip)
PIPI=("${PIP[@]}" install -q --no-index --find-links "$B/wheels")
"${PIPI[@]}" numpy cffi gguf "typer<0.29" rich sqlite-utils pyserial platformdirs jinja2 psutil diskcache \
  typing-extensions pytest hypothesis scikit-build-core setuptools wheel || fail "installing the wheels"
"${PIPI[@]}" --no-build-isolation afinn || fail "afinn"
say "building llama-cpp-python $V with CUDA for sm_$arch ($J jobs; FlashAttention kernels off: qes-edge never asks for them)"
export CMAKE_BUILD_PARALLEL_LEVEL=$J
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF" \
  "${PIPI[@]}" --no-build-isolation --no-deps "$B/llama_cpp_python-$V-trimmed.tar.gz" \
  || fail "building llama-cpp-python with CUDA (cuBLAS is needed: CUDA::cublas)"
say "llama-cpp-python built; GPU offload: $("$VENV/bin/python" -c 'from llama_cpp import llama_cpp as C; print(bool(C.llama_supports_gpu_offload()))')"
CMAKE_ARGS="-DQES_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch" "${PIPI[@]}" --no-build-isolation --no-deps . \
  || fail "building qes-edge with its CUDA plugin"
QES="$VENV/bin/qes-edge"
"$VENV/bin/python" -c "import qes_edge.native.binding as n, sys; a = n.available_backends(True); print('libqes backends usable:', a); sys.exit(0 if 'cuda' in a else 3)" \
  || fail "a GPU is here but libqes's cuda backend is not available (a driver older than the CUDA runtime $(nvcc --version | grep -o 'release [0-9.]*') needs?)"

# -- 2. the C tests and the backend tests -----------------------------------------------------------
cmake -S . -B /tmp/qes-gpu-build -DCMAKE_BUILD_TYPE=Release -DQES_BUILD_TESTS=ON -DQES_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" >/dev/null && cmake --build /tmp/qes-gpu-build -j "$J" >/dev/null \
  || fail "building the C tests"
/tmp/qes-gpu-build/test_native | tail -n 8
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_backends.py tests/test_placement.py 2>&1 | tail -n 5
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_backends.py -k cuda 2>&1 | tail -n 1

# -- 3. a small model trained with every layer on the GPU, replayed on the CPU -------------------
W=/tmp/qes-gpu-run
rm -rf "$W" && mkdir -p "$W"
export QES_EDGE_HOME="$W/home" OMP_WAIT_POLICY=PASSIVE
"$VENV/bin/python" models/synthetic.py "$W/syn.gguf" --layers 8 --embd 512
for i in $(seq 0 23); do
  a=$(( (i * 7) % 10 )); b=$(( (i * 3 + 4) % 10 ))
  ans=$([ "$a" -gt "$b" ] && echo 0 || echo 1)
  echo "{\"prompt\": \"Is $a bigger than $b? Answer:\", \"choices\": [\" yes\", \" no\"], \"answer\": $ans}"
done > "$W/data.jsonl"
TRAIN=(train --model "$W/syn.gguf" --task choice --data "$W/data.jsonl" --raw-prompt --population 8 --batch 4
       --alpha 0.05 --sigma 0.05 --steps 3 --json)
"$QES" info --model "$W/syn.gguf" --gpu-layers all | grep -- '--gpu-layers'
"$QES" "${TRAIN[@]}" --gpu-layers all --ledger "$W/gpu.qes" > "$W/gpu.jsonl" 2> "$W/gpu.err" \
  || { cat "$W/gpu.err"; fail "train --gpu-layers all"; }
grep -- '--gpu-layers' "$W/gpu.err"
"$QES" "${TRAIN[@]}" --ledger "$W/cpu.qes" > "$W/cpu.jsonl" 2> "$W/cpu.err" || { cat "$W/cpu.err"; fail "train on the CPU"; }
QES_EDGE_BACKEND=auto "$QES" replay --ledger "$W/gpu.qes" --out "$W/replayed.gguf" --base "$W/syn.gguf" > "$W/replay.out" 2>&1 \
  || { cat "$W/replay.out"; fail "the GPU run does not replay on the CPU"; }
"$VENV/bin/python" - "$W" <<'EOF'
import json, sys
w = sys.argv[1]
def steps(name):
    return [json.loads(l) for l in open(f"{w}/{name}.jsonl") if '"event": "step"' in l]
g, c = steps("gpu"), steps("cpu")
head = [json.loads(l) for l in open(f"{w}/gpu.jsonl") if '"event": "done"' in l][0]["head"]
replayed = open(f"{w}/replay.out").read()
print(f"GPU run: {len(g)} steps, codes changed {[s['changed'] for s in g]}; replay on the CPU: "
      f"{'every weights hash matched' if 'every weights hash matched' in replayed else 'MISMATCH'}; "
      f"head {'equal' if head in replayed else 'DIFFERS'}")
same = sum(a["rewards"] == b["rewards"] for a, b in zip(g, c))
print(f"rewards GPU vs CPU: {same} of {len(g)} steps bit-identical (a GPU's last bits differ: expected fewer)")
med = lambda xs: sorted(xs)[len(xs) // 2]
tg = med([sum(v for k, v in s["timings"].items() if k.endswith("_s")) for s in g])
tc = med([sum(v for k, v in s["timings"].items() if k.endswith("_s")) for s in c])
print(f"step time (median of 3): GPU {tg:.3f} s, CPU {tc:.3f} s ({tc / tg:.1f}x)")
EOF
# a CPU run followed with every layer in GPU memory: the GGUF written is the CPU replay's
"$QES" replay --ledger "$W/cpu.qes" --out "$W/cpu-replayed.gguf" --base "$W/syn.gguf" >/dev/null 2>&1 || fail "replay cpu.qes"
{
  "$QES" sync serve --ledger "$W/cpu.qes" --on socket://127.0.0.1:8799 > "$W/serve.out" 2>&1 &
  SP=$!
  for _ in $(seq 100); do [ -s "$W/serve.out" ] && break; sleep 0.3; done  # until it says where it listens
  "$QES" follow --peer socket://127.0.0.1:8799 --out "$W/followed.gguf" --base "$W/syn.gguf" --once --gpu-layers all \
    > "$W/follow.out" 2>&1 && cmp -s "$W/followed.gguf" "$W/cpu-replayed.gguf" \
    && say "follow --gpu-layers all of the CPU run: byte-equal to its CPU replay" \
    || { cat "$W/follow.out"; say "FAILED: follow --gpu-layers all (see above)"; }
  kill "$SP" 2>/dev/null
}

# -- 4. memory: training against plain llama-cpp-python inference, the same offload -----------------
"$VENV/bin/python" - "$W" <<'EOF'
import json, subprocess, sys, time
w = sys.argv[1]
def run(argv):
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    peak_gpu = 0
    while p.poll() is None:
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True).stdout
        for line in q.splitlines():
            try:
                peak_gpu = max(peak_gpu, int(line.split(",")[1]))
            except (IndexError, ValueError):
                pass
        time.sleep(0.2)
    return int(p.stderr.read().strip().splitlines()[-1]) / 1024, peak_gpu
infer = ("from llama_cpp import Llama; m = Llama(model_path=%r, n_gpu_layers=-1, use_mmap=False, verbose=False, "
         "n_ctx=512); [m.eval(m.tokenize(b'Is 7 bigger than 3? Answer:')) or m.reset() for _ in range(20)]"
         % f"{w}/syn.gguf")
rss_i, gpu_i = run([sys.executable, "-c", infer])
rss_t, gpu_t = run([f"{sys.prefix}/bin/qes-edge", "train", "--model", f"{w}/syn.gguf", "--task", "choice", "--data",
                    f"{w}/data.jsonl", "--raw-prompt", "--population", "8", "--batch", "4", "--steps", "6",
                    "--gpu-layers", "all", "--ledger", f"{w}/mem.qes"])
print(f"peak host RSS: train {rss_t:.0f} MiB, inference {rss_i:.0f} MiB ({rss_t / rss_i:.2f}x); "
      f"GPU memory (nvidia-smi, sampled): train {gpu_t} MiB, inference {gpu_i} MiB"
      + (f" ({gpu_t / gpu_i:.2f}x)" if gpu_i else ""))
EOF
say "done"
