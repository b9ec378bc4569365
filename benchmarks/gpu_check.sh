#!/usr/bin/env bash
# Every check and timing that needs a GPU, in one call of at most 9 min 50 s (never run in CI).
#
# On the GPU machine (no internet; Python 3.12 with torch, numpy, matplotlib, safetensors, tqdm and
# tensorboard preinstalled), from the repository root, with copies of ../shared/peers and
# ../shared/data/omniglot in a git-ignored folder that travels with the checkout:
#
#   mkdir -p .devdata && cp -r ../shared/peers .devdata/peers && cp -r ../shared/data/omniglot .devdata/
#   echo /.devdata/ >> .git/info/exclude
#   bash benchmarks/gpu_check.sh "$OUT" .devdata/peers .devdata/omniglot     # (device tool: carry .devdata)
#
# Each step has its own time limit, a failed step does not stop the next, and everything lands in
# OUT (at most 8 files, as the device tool brings back): log.txt (all output), device_check.json and
# commands.log (benchmarks/device_check.py: float64 CUDA-vs-CPU meta-gradients, CUDA graphs against
# eager calls, precision, resume across devices, Omniglot 20-way speed, analyze), speed-CASE.json
# for the sinusoid, conv4 and omniglot20 cases (benchmarks/speed.py --device cuda: mamlab's paths,
# CUDA graphs, the per-task loop, learn2learn, higher and TorchOpt; mamlab's paths also profiled:
# kernels per iteration, the GPU's busy time against the timed iteration, the top kernels),
# scale.json (tasks per second as the meta-batch grows to 1,024), the long-inner-loop and iMAML
# memory tables in log.txt, and last report.md (benchmarks/gpu_report.py: the README's tables and
# the targets, each met, missed or not measured; also the end of the call's output).
set -u
out=${1:?usage: gpu_check.sh OUT [PEERS_DIR] [OMNIGLOT_DIR]}
peers=${2:-../shared/peers}
data=${3:-../shared/data/omniglot}
device=${DEVICE:-cuda}  # DEVICE=cpu DRY_LIMIT=20: a dry run of the plumbing, every step cut at 20 s
BUDGET=${BUDGET:-585}  # seconds for the whole script: the device call's 600 s limit, less a margin
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" MAMLAB_PEERS="$peers"
log="$out/log.txt"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log it, go on whatever happens
  local name=$1 limit=$2; shift 2
  if [ -n "${DRY_LIMIT:-}" ]; then limit=$DRY_LIMIT; fi
  local t0=$SECONDS
  echo "=== $name: $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; python3 -c \
  "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  2>&1 | tee -a "$log"
if [ "$device" != cpu ] && ls "$peers"/wheels-cp312/*.whl >/dev/null 2>&1; then  # higher, TorchOpt, optree
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$peers"/wheels-cp312/*.whl 2>&1 | tail -2 | tee -a "$log"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
  echo "peer wheels not installed (a dry run, or none under $peers/wheels-cp312)" | tee -a "$log"
fi

data_args=()
if [ -f "$data/all_runs.zip" ]; then data_args=(--data "$data"); else
  echo "no Omniglot data under $data: device_check.py skips the Omniglot speed" | tee -a "$log"; fi

step device-check 200 python3 benchmarks/device_check.py --out /tmp/device_check --device "$device" \
  "${data_args[@]}"
cp /tmp/device_check/device_check.json /tmp/device_check/commands.log "$out/" 2>/dev/null
peers_impls=learn2learn,higher,torchopt
step speed-sinusoid 75 python3 benchmarks/speed.py --device "$device" --case sinusoid \
  --impls "loop,mamlab,mamlab:graph,mamlab:vmap,$peers_impls" --profile loop,mamlab,mamlab:graph \
  --json "$out/speed-sinusoid.json"
conv_impls="loop,mamlab,mamlab:graph,mamlab:conv,mamlab:graph:conv,mamlab:conv-nchw"
conv_profiled="mamlab,mamlab:conv,mamlab:graph:conv"  # kernels per iteration, device busy time, top kernels
step speed-conv4 105 python3 benchmarks/speed.py --device "$device" --case conv4 \
  --impls "$conv_impls,mamlab:conv:cudnn-benchmark,mamlab:graph:conv:cudnn-benchmark,$peers_impls" \
  --profile "$conv_profiled" --json "$out/speed-conv4.json"
step speed-omniglot20 92 python3 benchmarks/speed.py --device "$device" --case omniglot20 \
  --impls "$conv_impls,mamlab:graph:conv:cudnn-benchmark,$peers_impls" --profile "$conv_profiled" \
  --json "$out/speed-omniglot20.json"
step long-inner-loops 25 python3 benchmarks/long_inner_loops.py --device "$device" --repeat 3
step imaml-memory 15 python3 benchmarks/imaml_memory.py --device "$device" --iters 10
# last, with what is left of the call's ${BUDGET}s (60 s at least): it prints each size as it comes
left=$((BUDGET - SECONDS)); if [ "$left" -lt 60 ]; then left=60; fi
step scale "$left" python3 benchmarks/speed.py --device "$device" --scale 32,128,512,1024 --iters 4 --warmup 1 \
  --impls mamlab,mamlab:conv --json "$out/scale.json"
# the tables and the targets, met or not, from the files above (the end of the call's output)
python3 benchmarks/gpu_report.py "$out" 2>&1 | tee "$out/report.md"
echo "=== done" | tee -a "$log"
