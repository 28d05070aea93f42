#!/usr/bin/env bash
# The GPU checks of one device lease, as one call (see BENCHMARKS.md, "GPU"): the CUDA tests (mixed precision), retrieval
# evaluation ours vs row-by-row on the GPU (tiny and small model, N=1000 and 5000), the stage-1 step in fp32
# and bf16, and the training jobs on the GPU in one process (tests/integration/test_train_cuda.py: the loop's
# autocast, a failure and resume, stage 2 from stage 1; needs MLflow's wheels in .whl), and the same jobs under Ray
# Train on the GPU (tests/integration/test_train_ray_cuda.py, nccl) with the Ray-vs-plain overhead on the GPU
# (bench_train_ray.py --device cuda). The image has neither Ray nor MLflow: carry them, either as wheels in .whl
# or as one .devsite/site.tar.xz of unpacked cp312 packages (Ray's wheel alone is over the 64 MiB a call carries;
# unpacked without its Java jars and RLlib, and xz-packed, Ray + MLflow + FAISS are ~53 MiB: `bash benchmarks/devsite.sh`).
# CapFilt on the GPU (benchmarks/capfilt_device_parity.py) ranks with the stand-ins in $STANDINS (default
# .devsite/standins: the foundation step's captioner/ and clip/, weights stored fp16 to fit the carry), else with
# random-init models. Each part has its own time limit; everything it prints goes to $OUT/device.log and the results JSON to
# $OUT/results.tar. PARTS="tests train" (say) runs only those parts (tests train ray retrieval stage1 capfilt); on an H200
# tests + train + ray took ~8.5 min (ray ~6.5 of it), so all five parts need two calls.
#   run on the device machine:  bash benchmarks/device_check.sh        (carry .whl or .devsite: what the image lacks)
#   dry run here on the CPU:     DEV=cpu QUICK=1 NO_WHEELS=1 PY=.venv/bin/python OUT=/tmp/dc bash benchmarks/device_check.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DEV=${DEV:-cuda}
OUT=${OUT:-/tmp/device_check}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
elif [ -z "${NO_WHEELS:-}" ] && [ -f .devsite/site.tar.xz ]; then
  mkdir -p /tmp/devsite && tar -xJf .devsite/site.tar.xz -C /tmp/devsite || exit 1
  export PYTHONPATH=/tmp/devsite/site PATH=/tmp/devsite/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ -n "${QUICK:-}" ]; then TINY="200"; SMALL="20 40"; STEPS=2; SIZE=tiny; else
  TINY="1000 5000"; SMALL="1000 5000"; STEPS=20; SIZE=small; fi

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log it, print its last lines
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name: $*" | tee -a "$OUT/device.log"
  timeout "$limit" "$@" >"$OUT/part.log" 2>&1
  rc=$?
  cat "$OUT/part.log" >>"$OUT/device.log"
  echo "=== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/device.log"
  grep -E "passed|failed|Error|speedup|samples_per_s_per_100|\"ratio\"|matmul_ceiling|^local:|^ray:" "$OUT/part.log" | tail -n 6
  rm -f "$OUT/part.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $PY -c "import torch, transformers, faiss; print('torch', torch.__version__, 'transformers', transformers.__version__,
'faiss', faiss.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} 2>&1 | tee -a "$OUT/device.log"
STANDINS=${STANDINS:-$( [ -d .devsite/standins ] && echo .devsite/standins )}
PARTS=${PARTS:-tests train ray retrieval stage1 capfilt}
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
want tests && part tests 120 $PY -m pytest -q -p no:cacheprovider tests/unit/blip2/test_cuda.py tests/unit/blip2/test_losses.py \
  tests/unit/blip2/test_vision.py tests/unit/blip2/test_qformer.py tests/unit/pipelines/test_retrieval.py
want train && part train_loop 240 $PY -m pytest -q -p no:cacheprovider tests/integration/test_train_cuda.py
want ray && part train_ray 300 $PY -m pytest -q -p no:cacheprovider tests/integration/test_train_ray_cuda.py
if [ "$DEV" != cpu ] && want ray; then
  part ray_overhead 240 $PY benchmarks/bench_train_ray.py --device "$DEV" --threads 4 --repeats 3
fi
want retrieval && part retrieval_tiny 150 $PY benchmarks/bench_retrieval.py --device "$DEV" --sizes $TINY
want stage1 && part stage1_fp32 45 $PY benchmarks/bench_stage1_step.py --device "$DEV" --size $SIZE --steps $STEPS
if [ "$DEV" != cpu ] && want stage1; then
  part stage1_bf16 45 $PY benchmarks/bench_stage1_step.py --device "$DEV" --size $SIZE --steps $STEPS --precision bf16
fi
if [ "$DEV" != cpu ] && want capfilt; then  # the captioner and CLIP in fp16 on the GPU against the host CPU, and Ray Data
  part capfilt_gpu 300 $PY benchmarks/capfilt_device_parity.py --images 512 \
    ${STANDINS:+--models "$STANDINS"}
fi
want retrieval && part retrieval_small 150 $PY benchmarks/bench_retrieval.py --device "$DEV" --model small --sizes $SMALL
tar -cf "$OUT/results.tar" -C benchmarks/results .
