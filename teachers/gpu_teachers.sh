#!/usr/bin/env bash
# In-domain IResNet teachers on a lent GPU machine, in one prepared run (issue 13, part 2).
#
# On the GPU machine (the `device` tool runs this in the repository root; OUT is its folder of files to bring back):
#     bash teachers/gpu_teachers.sh "$OUT"                         # timeout_s 600
# It generates synthfaces:large (10,000 identities x 12), trains r50 then r100 on it with torchrun (nccl, bf16
# autocast, channels_last: the trainer's CUDA defaults), each for a wall-clock budget turned into a step count from
# a throughput measured first with engine.bench, builds each teacher's int8 knowledge cache of the default SynthFaces
# training set and its accuracy on the default verification set, and packs caches and training logs into $OUT as
# parts of at most 15 MiB (the device tool brings back at most 8 files of 16 MiB).
#
# Back on this machine, from the folder the tool fetched the files into:
#     bash teachers/gpu_teachers.sh --unpack FILES_AT
# rebuilds teachers/zoo/r50-synthfaces/ and teachers/zoo/r100-synthfaces/ (checked against their manifests) and
# runs/gpu-teachers/ (logs, learning curves); then `python -m distill.run --teacher r100` runs on a CPU-only machine
# from the shipped cache.
#
# Rehearsal on a CPU (tiny data, r18, two torchrun processes over gloo, seconds of training):
#     SMOKE=1 bash teachers/gpu_teachers.sh /tmp/gpu-out && bash teachers/gpu_teachers.sh --unpack /tmp/gpu-out
#
# Knobs (environment): ARCHS ("r50 r100"), SECONDS_PER_ARCH ("150 240": training wall-clock budget of each, in
# order), BATCH (512, global), PYTHON (python3), ZOO (teachers/zoo), WORK (runs/gpu-teachers).
set -euo pipefail

PYTHON=${PYTHON:-python3}
ZOO=${ZOO:-teachers/zoo}
WORK=${WORK:-runs/gpu-teachers}
PART_SIZE=15m

if [[ "${1:-}" == "--unpack" ]]; then
    src=${2:?usage: gpu_teachers.sh --unpack FOLDER}
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

OUT_DIR=${1:?usage: gpu_teachers.sh OUT_DIR | --unpack FOLDER}
mkdir -p "$OUT_DIR" "$WORK"
export PYTHONUNBUFFERED=1
if [[ "${SMOKE:-0}" == 1 ]]; then
    ARCHS=${ARCHS:-r18}; SECONDS_PER_ARCH=${SECONDS_PER_ARCH:-2}; BATCH=${BATCH:-8}
    LARGE=synthfaces:tiny; DEFAULT=synthfaces:tiny; VAL=(synthfaces:tiny); BENCH_STEPS=2; EVALS=1
    NPROC=2; DEVICE=cpu; EXTRA=(--preset smoke --amp off --workers 0)
else
    ARCHS=${ARCHS:-r50 r100}; SECONDS_PER_ARCH=${SECONDS_PER_ARCH:-150 240}; BATCH=${BATCH:-512}
    LARGE=synthfaces:large; DEFAULT=synthfaces; VAL=(synthfaces:small synthfaces); BENCH_STEPS=10; EVALS=4
    NPROC=$(nvidia-smi -L | wc -l); DEVICE=cuda; EXTRA=(--preset gpu)
    nvidia-smi -L
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    for size in large default small; do
        "$PYTHON" -m facedata.synthfaces --size "$size" --generate --workers "$(nproc)"
    done
fi
read -r -a budgets <<< "$SECONDS_PER_ARCH"
i=0
for arch in $ARCHS; do
    budget=${budgets[$i]:-${budgets[-1]}}; i=$((i + 1))
    run="$WORK/$arch"
    # steps from a measured rate, so the poly schedule ends inside the budget instead of being cut mid-way
    "$PYTHON" -m engine.bench --arch "$arch" --batch-size "$BATCH" --steps "$BENCH_STEPS" --warmup 2 --device "$DEVICE" \
        --json "$run-bench.json"
    steps=$("$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1]))[0]; \
print(max(4, int(float(sys.argv[2]) * r['images_per_s'] / int(sys.argv[3]))))" "$run-bench.json" "$budget" "$BATCH")
    echo "[$arch] $steps steps of $BATCH images in ~$budget s"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m teachers.train --arch "$arch" \
        --data "$LARGE" --val "${VAL[@]}" --steps "$steps" --batch-size "$BATCH" --warmup-steps $((steps / 10)) \
        --eval-every $((steps / EVALS)) --ckpt-every $((steps / 2)) \
        --device "$DEVICE" --out "$run/teacher" --no-results --resume "${EXTRA[@]}"
    cache="$arch-synthfaces"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m teachers.cache --teacher "$arch" \
        --teacher-weights "$run/teacher/model.safetensors" --data "$DEFAULT" --storage int8 --device "$DEVICE" \
        --out "$WORK/$cache" --val "$DEFAULT" --force
    tar -c -C "$WORK" "$cache" | split -b "$PART_SIZE" -d - "$OUT_DIR/$cache.tar.part"
done
tar -c -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npy' . \
    | split -b "$PART_SIZE" -d - "$OUT_DIR/logs.tar.part"
ls -l "$OUT_DIR"
