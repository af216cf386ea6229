#!/usr/bin/env bash
# In-domain IResNet teachers in one prepared run (issue 13): on a lent GPU machine, or on a fast CPU within a session.
#
# On a GPU machine (the `device` tool runs this in the repository root; OUT is its folder of files to bring back):
#     bash teachers/train_teachers.sh "$OUT"                        # timeout_s 600
# It generates synthfaces:large (10,000 identities x 12), trains r50 then r100 on it with torchrun (nccl, bf16
# autocast, channels_last: the trainer's CUDA defaults), each for a wall-clock budget turned into a step count from
# a throughput measured first with engine.bench, builds each teacher's int8 knowledge cache of the default SynthFaces
# training set and its accuracy on the default verification set, and packs caches and training logs into $OUT as
# parts of at most 15 MiB (the device tool brings back at most 8 files of 16 MiB).
#
# On a machine without a GPU the same run trains r18 on the CPU (one process, bf16 where the CPU computes it natively,
# else fp32) for SECONDS_PER_ARCH (default 5400) and evaluates on synthfaces:small during training; it prints the
# measured rate and how many images the budget buys before it starts, so a too-slow CPU is visible at once (r18
# trains at 3.1 images/s on a 2-core AMD EPYC with AVX2 only, ~25 on a 2-core Xeon with AMX). Run it in the
# background (`nohup bash teachers/train_teachers.sh runs/teachers-out > runs/teachers.log 2>&1 &`); a killed run
# continues from its checkpoint when started again with the same settings.
#
# Back on this machine, from the folder the files are in:
#     bash teachers/train_teachers.sh --unpack FILES_AT
# rebuilds teachers/zoo/ARCH-synthfaces/ (checked against their manifests) and runs/train-teachers/ (logs, learning
# curves); then `python -m distill.run --teacher r100` (or r18) runs on a CPU-only machine from the shipped cache.
#
# Rehearsal on a CPU (tiny data, r18, two torchrun processes over gloo, seconds of training):
#     SMOKE=1 bash teachers/train_teachers.sh /tmp/out && bash teachers/train_teachers.sh --unpack /tmp/out
#
# Knobs (environment): DEVICE (cuda when nvidia-smi lists a GPU, else cpu), ARCHS ("r50 r100" on GPU, "r18" on CPU),
# SECONDS_PER_ARCH ("150 240" on GPU, "5400" on CPU: training wall-clock budget of each, in order), BATCH (512 on
# GPU, 64 on CPU; global), PYTHON (python3), ZOO (teachers/zoo), WORK (runs/train-teachers).
set -euo pipefail

PYTHON=${PYTHON:-python3}
ZOO=${ZOO:-teachers/zoo}
WORK=${WORK:-runs/train-teachers}
PART_SIZE=15m

if [[ "${1:-}" == "--unpack" ]]; then
    src=${2:?usage: train_teachers.sh --unpack FOLDER}
    mkdir -p "$ZOO" "$WORK"
    for first in "$src"/*.tar.part00; do
        [[ -e "$first" ]] || { echo "error: no *.tar.part00 in $src" >&2; exit 2; }
        name=$(basename "$first" .tar.part00)
        dest=$([[ "$name" == logs ]] && echo "$WORK" || echo "$ZOO")
        cat "$src/$name".tar.part* | tar -x -C "$dest"
        if [[ "$name" != logs ]]; then
            "$PYTHON" -m teachers.cache --verify "$dest/$name"
        fi
        echo "unpacked $name -> $dest"
    done
    exit 0
fi

OUT_DIR=${1:?usage: train_teachers.sh OUT_DIR | --unpack FOLDER}
mkdir -p "$OUT_DIR" "$WORK"
export PYTHONUNBUFFERED=1
if [[ -z "${DEVICE:-}" ]]; then
    DEVICE=$([[ "${SMOKE:-0}" != 1 ]] && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
fi
if [[ "${SMOKE:-0}" == 1 ]]; then
    ARCHS=${ARCHS:-r18}; SECONDS_PER_ARCH=${SECONDS_PER_ARCH:-2}; BATCH=${BATCH:-8}
    LARGE=synthfaces:tiny; DEFAULT=synthfaces:tiny; VAL=(synthfaces:tiny); BENCH_STEPS=2; EVALS=1; CKPTS=2
    NPROC=2; AMP=off; EXTRA=(--preset smoke --workers 0)
elif [[ "$DEVICE" == cuda ]]; then
    ARCHS=${ARCHS:-r50 r100}; SECONDS_PER_ARCH=${SECONDS_PER_ARCH:-150 240}; BATCH=${BATCH:-512}
    LARGE=synthfaces:large; DEFAULT=synthfaces; VAL=(synthfaces:small synthfaces); BENCH_STEPS=10; EVALS=4; CKPTS=2
    NPROC=$(nvidia-smi -L | wc -l); AMP=auto; EXTRA=(--preset gpu)
    nvidia-smi -L
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
else
    # the default set's accuracy is measured once, by the cache build: 6,000 pairs every eval would cost a CPU hours
    ARCHS=${ARCHS:-r18}; SECONDS_PER_ARCH=${SECONDS_PER_ARCH:-5400}; BATCH=${BATCH:-64}
    LARGE=synthfaces:large; DEFAULT=synthfaces; VAL=(synthfaces:small); BENCH_STEPS=3; EVALS=8; CKPTS=40
    AMP=$("$PYTHON" -c 'from engine.trainer import cpu_has_native_bf16 as b; print("bf16" if b() else "off")')
    NPROC=1; EXTRA=(--preset cpu)
fi
if [[ "${SMOKE:-0}" != 1 ]]; then
    for size in large default small; do
        "$PYTHON" -m facedata.synthfaces --size "$size" --generate --workers "$(nproc)"
    done
fi
read -r -a budgets <<< "$SECONDS_PER_ARCH"
i=0
for arch in $ARCHS; do
    budget=${budgets[$i]:-${budgets[-1]}}; i=$((i + 1))
    run="$WORK/$arch"
    # steps from a measured rate, so the poly schedule ends inside the budget instead of being cut mid-way; measured
    # once per run directory, so that starting the script again resumes the same schedule
    [[ -s "$run-bench.json" ]] || "$PYTHON" -m engine.bench --arch "$arch" --batch-size "$BATCH" \
        --steps "$BENCH_STEPS" --warmup 2 --device "$DEVICE" --amp "$AMP" --json "$run-bench.json"
    steps=$("$PYTHON" - "$run-bench.json" "$budget" "$BATCH" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))[0]
budget, batch = float(sys.argv[2]), int(sys.argv[3])
steps = max(4, int(budget * r["images_per_s"] / batch))
print(f"[{r['arch']}] {steps} steps x {batch} = {steps * batch:,} images in ~{budget:.0f} s at {r['images_per_s']} "
      f"images/s on {r['hardware']} (load {r['load_avg_1min']})", file=sys.stderr)
print(steps)
PY
)
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m teachers.train --arch "$arch" \
        --data "$LARGE" --val "${VAL[@]}" --steps "$steps" --batch-size "$BATCH" --warmup-steps $((steps / 10)) \
        --eval-every $((steps / EVALS)) --ckpt-every $((steps / CKPTS > 0 ? steps / CKPTS : 1)) \
        --device "$DEVICE" --amp "$AMP" --out "$run/teacher" --no-results --resume "${EXTRA[@]}"
    cache="$arch-synthfaces"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m teachers.cache --teacher "$arch" \
        --teacher-weights "$run/teacher/model.safetensors" --data "$DEFAULT" --storage int8 --device "$DEVICE" \
        --out "$WORK/$cache" --val "$DEFAULT" --force
    tar -c -C "$WORK" "$cache" | split -b "$PART_SIZE" -d - "$OUT_DIR/$cache.tar.part"
done
tar -c -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npy' . \
    | split -b "$PART_SIZE" -d - "$OUT_DIR/logs.tar.part"
ls -l "$OUT_DIR"
