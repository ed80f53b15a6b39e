#!/usr/bin/env bash
# What the recall drills need before a model learns their lookup: the toy's model (2 layers of 128,
# TTT-Linear in both, a 16-frame window) trained by train.py on associative recall (MQAR) moved step
# by step toward data.py's drills, each run read back by evaluate.py on held-out data of another
# seed. Runs go side by side, two a GPU. docs/experiment/notes.md has the tables.
#
#   bash scripts/drill_ladder.sh OUT [GROUP...]     GROUP: mqar, long, window (default: all three)
#
#   mqar    MQAR with a silent second stream (scripts/mqar_codes.py), the recalls alone in the loss:
#           the silent stream embedded or not, 2-frame keys, keys and values from the same codes
#   long    data.py drills in 2-4 minute conversations, one frame a value (split patterns)
#   window  the same drills in conversations of one training window (257 frames), the loss's weight
#           on the recalls from 1 to 10000, the silent stream embedded or not, window only, TTT-MLP,
#           8 codebooks (tied as speech's: w8_w100, not yet run; the reach group's r8 has 8 codebooks)
#   reach   toward the experiment: drill conversations of one 1024-frame window, recalls 2-40 s
#           back, a 20 s window (250 frames) against the toy's 1.28 s, 1 or 8 codebooks, and the
#           experiment's model (8 layers of 512, TTT-Linear in the top 2: r8_exp)
#
# STEPS, HOURS, DEVICE and PER_GPU change the scale (the test suite runs a tiny one on the CPU).
set -u
OUT=${1:?usage: bash scripts/drill_ladder.sh OUT [mqar] [long] [window]}
shift
GROUPS_=${*:-mqar long window reach}
R=$(cd "$(dirname "$0")/.." && pwd)
HOURS=${HOURS:-220}
DEVICE=${DEVICE:-cuda}
PER_GPU=${PER_GPU:-2}
NG=1
if [ "$DEVICE" = cuda ]; then NG=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l); fi
mkdir -p "$OUT" && cd "$OUT" || exit 1
t0=$(date +%s)

D="--events_per_min 8 --same_speaker true --tied_patterns true --reserve_patterns true --quiz_share 1
   --quiz_min_s 2.5 --quiz_max_s 15 --n_codebooks 1 --value_frames 1 --pattern_codes 256 --split_patterns true"
LONG="--min_minutes 2 --max_minutes 4"
WIN="--min_minutes 0.3428 --max_minutes 0.3428"     # 257 frames: train.py --seq_len 256 reads all of it
WIN1K="--min_minutes 1.36733 --max_minutes 1.36733 --quiz_min_s 2 --quiz_max_s 40"    # 1025 frames
SEQS=$(python -c "print(max(20, int($HOURS * 45000 / 220)))")
data() {  # name, then data.py synthetic or mqar_codes.py arguments; seed 2 to train, 3 held out
  local n=$1; shift
  if [ "$1" = mqar ]; then shift
    python "$R/scripts/mqar_codes.py" --streams 2 --out "$n.bin" --sequences "$SEQS" --seed 0 "$@" > /dev/null &&
    python "$R/scripts/mqar_codes.py" --streams 2 --out "${n}h.bin" --sequences 200 --seed 1 "$@" > /dev/null
  else
    python "$R/data.py" synthetic --out "$n.bin" --hours "$HOURS" --seed 2 $D "$@" > /dev/null 2>&1 &&
    python "$R/data.py" synthetic --out "${n}h.bin" --hours 2 --seed 3 $D "$@" > /dev/null 2>&1
  fi
}
for g in $GROUPS_; do case $g in
  mqar) data mq mqar & data mqk mqar --key_frames 2 & data mqs mqar --shared_codes & data mqks mqar --key_frames 2 --shared_codes & ;;
  long) data p2s $LONG --quiz_spacing_s 1 & data p4s $LONG --quiz_spacing_s 0 &
        data p5s $LONG --quiz_spacing_s 3 --value_frames 4 --pattern_codes 1024 & ;;
  window) data w $WIN --quiz_spacing_s 1 & data wu $WIN --quiz_spacing_s 1 --split_patterns false &
          data w8 $WIN --quiz_spacing_s 1 --n_codebooks 8 & ;;
  reach) data r1 $WIN1K --quiz_spacing_s 1 & data r8 $WIN1K --quiz_spacing_s 1 --n_codebooks 8 & ;;
  *) echo "unknown group $g (mqar, long, window, reach)"; exit 2 ;;
esac; done
wait
echo "data: $(( $(date +%s) - t0 )) s"

TR="--preset demo --dim 128 --n_layers 2 --n_heads 4 --n_kv_heads 2 --hidden 384 --window 16 --n_ttt 2 --ttt_heads 2
    --ttt_mini_batch 16 --depth_layers 0 --mode minibatch --seq_len 256 --batch_size 64 --lr 1e-3 --min_lr 1e-3
    --warmup 50 --dtype float32 --device $DEVICE --eval_interval 1000 --log_interval 100"
i=0
run() {  # run name, data name, steps, then train.py arguments
  local name=$1 d=$2 steps=${STEPS:-$3}; shift 3
  ( [ "$DEVICE" = cuda ] && export CUDA_VISIBLE_DEVICES=$(( i % NG ))
    python "$R/train.py" --data "$d.bin" --out_dir "r_$name" $TR --max_steps "$steps" "$@" > "r_$name.log" 2>&1 &&
    python "$R/evaluate.py" --ckpt "r_$name" --data "${d}h.bin" --out "r_$name/eval.json" --gen_minutes 0 --chunk 256 \
        --batch 16 --dtype float32 --device "$DEVICE" --quiet > "r_$name.eval.log" 2>&1 || echo "r_$name failed: see its logs" ) &
  i=$((i + 1))
  if [ $(( i % (NG * PER_GPU) )) -eq 0 ]; then wait; fi
}
for g in $GROUPS_; do case $g in
  mqar)
    run mq_embedded mq 4000 --recall_weight 10000
    run mq mq 4000 --recall_weight 10000 --silence 2047
    run mqk mqk 4000 --recall_weight 10000 --silence 2047
    run mqs mqs 4000 --recall_weight 10000 --silence 2047
    run mqks mqks 4000 --recall_weight 10000 --silence 2047 ;;
  long)
    run p2s_embedded p2s 5000 --recall_weight 10000
    run p2s p2s 5000 --recall_weight 10000 --silence data
    run p2s_w100 p2s 5000 --recall_weight 100 --silence data
    run p2s_1024 p2s 5000 --recall_weight 10000 --silence data --seq_len 1024 --batch_size 16
    run p4s p4s 5000 --recall_weight 10000 --silence data
    run p5s p5s 5000 --recall_weight 10000 --silence data ;;
  window)
    run w_w10000 w 5000 --recall_weight 10000 --silence data
    run w_w100 w 5000 --recall_weight 100 --silence data
    run w_w100_seed7 w 5000 --recall_weight 100 --silence data --seed 7
    run w_w10 w 5000 --recall_weight 10 --silence data
    run w_w1 w 5000 --recall_weight 1 --silence data
    run w_w100_embedded w 5000 --recall_weight 100
    run w_w100_window w 5000 --recall_weight 100 --silence data --n_ttt 0
    run w_w100_mlp w 5000 --recall_weight 100 --silence data --ttt_type mlp
    run wu_w100 wu 5000 --recall_weight 100 --silence data
    run w8_w100 w8 5000 --recall_weight 100 --silence data ;;
  reach)
    K="--recall_weight 100 --silence data --seq_len 1024 --batch_size 16"
    EXP="--dim 512 --n_layers 8 --n_heads 8 --n_kv_heads 4 --hidden 1408 --ttt_heads 8 --batch_size 8"
    run r8_exp r8 2500 $K --window 250 $EXP
    run r1 r1 5000 $K --window 250
    run r1_window r1 5000 $K --window 250 --n_ttt 0
    run r1_w16 r1 5000 $K --window 16
    run r8 r8 5000 $K --window 250
    run r8_window r8 5000 $K --window 250 --n_ttt 0
    run r8_w16 r8 5000 $K --window 16
    run r1_mlp r1 5000 $K --window 250 --ttt_type mlp ;;
esac; done
wait
echo "all: $(( $(date +%s) - t0 )) s"
python - <<'PY'
import glob, json, re
print("| run | steps | held-out recall | in window | beyond window | beyond reach | chance | recalls |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for f in sorted(glob.glob("r_*/eval.json")):
    name = f.split("/")[0]
    e = json.load(open(f))
    b = [x for x in e["recall"]["buckets"] if x["codes"]]
    n = sum(x["codes"] for x in b)
    acc = sum(x["accuracy"] * x["codes"] for x in b) / max(n, 1)
    steps = re.findall(r"done: step (\d+)", open(name + ".log").read())
    part = lambda k: f"{e['recall'][k]['accuracy']:.3f}" if e["recall"][k].get("accuracy") is not None else "-"
    print(f"| {name[2:]} | {steps[-1] if steps else '?'} | {acc:.3f} | {part('within_window')} | "
          f"{part('beyond_window')} | {part('beyond_reach')} | {e['chance']['accuracy']:.4f} | {n} |")
PY
