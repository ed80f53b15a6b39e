#!/usr/bin/env bash
# Which of the gpu scale's differences from scripts/recall_pilot.py delays learning the recall drills?
# Eight train.py runs of the gpu scale's window model (8 layers of 512, no depth-decoder block), 3000
# steps of 16 x 512 frames at a constant learning rate of 1e-3, each changing one or two things, then
# evaluate.py on held-out drills (recall of values said 2-10 s earlier, chance 1/1024):
#
#     bash scripts/recall_factors.sh OUTDIR            # on one GPU: two batches of four runs side by side
#     BATCH=2 bash scripts/recall_factors.sh OUTDIR    # only the second batch (the figures: one batch a run)
#
# data: t0   drills only, 2-4 minute conversations (recall_pilot.py's layout)
#       mix  the gpu scale's: 90% drills, 10% ordinary conversations, 10-90 minutes each
set -u
O=${1:-recall_factors}; D="$O/data"; mkdir -p "$D"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
R="--n_codebooks 8 --events_per_min 8 --pattern_codes 1024 --value_frames 32 --same_speaker true --tied_patterns true"
[ -f "$D/held.bin" ] || {
  python data.py synthetic --out "$D/t0.bin" --hours 20 --min_minutes 2 --max_minutes 4 $R --near_share 1 --near_max_s 10 --quiz_share 1 > /dev/null 2>&1 &
  python data.py synthetic --out "$D/mix.bin" --hours 40 --min_minutes 10 --max_minutes 90 $R --near_share 0.75 --near_max_s 30 --quiz_share 0.9 --quiz_max_s 10 > /dev/null 2>&1 &
  python data.py synthetic --out "$D/held.bin" --hours 0.4 --min_minutes 4 --max_minutes 4 --seed 1 $R --near_share 0.75 --near_max_s 30 --quiz_share 1 --quiz_max_s 10 > /dev/null 2>&1 &
  wait; }
COMMON="--seq_len 512 --batch_size 16 --max_steps ${STEPS:-3000} --lr 1e-3 --min_lr 1e-3 --warmup 50 --log_interval 250 --eval_interval 1000 --preset small --dim 512 --n_layers 8 --n_ttt 0 --depth_layers 0 --seed 0"
PILOT="--n_heads 16 --n_kv_heads 8 --hidden 1536 --window 512 --depth_dim 64"          # recall_pilot.py's shape
GPUS="--n_heads 8 --n_kv_heads 4 --hidden 1408 --window 250 --depth_dim 256 --depth_heads 4"  # the gpu scale's
run() { n=$1; shift; python train.py --out_dir "$O/$n" "$@" > "$O/$n.log" 2>&1
        python evaluate.py --ckpt "$O/$n" --data "$D/held.bin" --out "$O/$n.eval.json" --gen_minutes 0 --chunk 512 --batch 4 --quiet > "$O/$n.eval.log" 2>&1; }
# batch  name             data  mode      dtype     shape
RUNS="1 pilot_shape      t0  minibatch float32  PILOT
1 t0_mini_f32      t0  minibatch float32  GPUS
1 t0_mini_bf16     t0  minibatch bfloat16 GPUS
1 mix_stream_bf16  mix streaming bfloat16 GPUS
2 mix_mini_bf16    mix minibatch bfloat16 GPUS
2 t0_stream_bf16   t0  streaming bfloat16 GPUS
2 t0_stream_f32    t0  streaming float32  GPUS
2 mix_mini_f32     mix minibatch float32  GPUS"
for batch in ${BATCH:-1 2}; do   # four runs side by side, then the next four
  while read -r b n data mode dtype shape; do
    [ "$b" = "$batch" ] && run "$n" --data "$D/$data.bin" --mode "$mode" --dtype "$dtype" $COMMON ${!shape} &
  done <<< "$RUNS"
  wait
done
echo "| run | data | mode | dtype | loss at step 1000 / 2000 / 3000 | held-out drills: recall |"
echo "|---|---|---|---|---|---|"
for f in "$O"/*.eval.json; do
  n=$(basename "$f" .eval.json)
  python - "$O" "$n" <<'PY'
import json, re, sys
o, n = sys.argv[1:]
log = open(f"{o}/{n}.log").read()
loss = {int(m[0]): m[1] for m in re.findall(r"^step (\d+)/\d+ \S+ \| loss ([0-9.]+)", log, re.M)}
acc = json.load(open(f"{o}/{n}.eval.json"))["recall"]["within_window"]["accuracy"]
data = "t0" if "t0" in n or n == "pilot_shape" else "mix"
mode = "streaming" if "stream" in n else "minibatch"
dtype = "bfloat16" if "bf16" in n else "float32 (TF32)"
print(f"| {n} | {data} | {mode} | {dtype} | {' / '.join(loss.get(s, '-') for s in (1000, 2000, 3000))} | {acc:.3f} |")
PY
done
