#!/usr/bin/env bash
# The GPU figures of README in one run, on one machine with two H100s (about 9 minutes):
#
#     bash bench/h100.sh OUTDIR
#
# 1. Both GPUs: a DDP run and an FSDP run (Qwen2.5-1.5B-shaped backbone) through torchrun.
# 2. GPU 0: the long-conversation experiment (experiment.py --scale gpu).
#    GPU 1: the one-GPU baselines of step 1, then the Mimi, generation and 7B-step benchmarks and a
#    profile of a training step.
# Logs and tables land in OUTDIR; the official Mimi package (moshi) is used when importable.
set -u
O=${1:-h100_out}
mkdir -p "$O"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
python data.py synthetic --hours 4 --min_minutes 5 --max_minutes 15 --out "$O/synth.bin" 2>/dev/null

DDP="--data $O/synth.bin --preset small --seq_len 256 --max_steps 30 --warmup 5 --eval_interval 0 --log_interval 5 --save false"
FSDP="--data $O/synth.bin --preset qwen2.5-1.5b --mode minibatch --seq_len 128 --batch_size 4 --max_steps 10 --warmup 2 --lr 3e-5 --min_lr 3e-6 --eval_interval 0 --log_interval 1 --save false"

# 1. two GPUs
timeout 80 torchrun --nproc_per_node 2 train.py $DDP --batch_size 8 --out_dir "$O/ddp2" > "$O/ddp2.log" 2>&1
timeout 120 torchrun --nproc_per_node 2 train.py $FSDP --fsdp true --out_dir "$O/fsdp2" > "$O/fsdp2.log" 2>&1

# 2. GPU 0: the experiment; GPU 1: baselines and benchmarks
CUDA_VISIBLE_DEVICES=0 timeout 430 python experiment.py --scale gpu --out "$O/exp" > "$O/exp.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 50 python train.py $DDP --batch_size 16 --out_dir "$O/ddp1" > "$O/ddp1.log" 2>&1
  timeout 80 python train.py $FSDP --grad_accum 2 --out_dir "$O/fsdp1" > "$O/fsdp1.log" 2>&1   # the same 8 windows a step
  timeout 110 python bench/mimi.py --device cuda --minutes 1 5 --no-compile > "$O/bench_mimi.md" 2>&1
  timeout 160 python bench/lm.py generate --frames 100 > "$O/bench_generate.md" 2>&1
  timeout 45 python bench/lm.py step --presets qwen2.5-7b --frames 100 > "$O/bench_step7b.md" 2>&1
  timeout 35 python bench/lm.py profile > "$O/profile.txt" 2>&1
)
wait

echo "== DDP: 1 GPU x 16 rows vs 2 GPUs x 8 rows (same global batch)"
grep -h "^step\|^done" "$O/ddp1.log" "$O/ddp2.log"
echo "== FSDP: Qwen2.5-1.5B-shaped backbone, unsharded on 1 GPU (4 rows x 2 micro-batches) vs sharded on 2 (4 rows each)"
grep -h "^model\|^step\|^done" "$O/fsdp1.log" "$O/fsdp2.log"
for f in bench_mimi.md bench_generate.md bench_step7b.md; do echo "== $f"; sed -n '/^### /,$p' "$O/$f"; done
echo "== experiment"; tail -n 40 "$O/exp.log"
