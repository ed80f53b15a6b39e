# Multi-query associative recall beyond the attention window (scripts/recall_toy.py --mqar), toy
# models side by side on one GPU, each trained for the same wall time, then read on held-out
# sequences up to 67,500 tokens long (90 minutes of frames at 12.5 Hz):
#
#   bash scripts/recall_mqar.sh main [OUT]       # window only, TTT-Linear, TTT-MLP, two controls
#   bash scripts/recall_mqar.sh variants [OUT]   # TTT-Linear: another seed, top layer only, more pairs,
#                                                # longer training sequences, the speech path
#   bash scripts/recall_mqar.sh all [OUT]        # both at once (12 processes on the GPU)
#   bash scripts/recall_mqar.sh factors [OUT]    # TTT-Linear with what the experiment's events have: the
#                                                # loss on every token, filler drawn from the pairs' tokens
#   MINUTES=2.2 bash scripts/recall_mqar.sh speech [OUT]   # TTT-Linear through the text path and through
#                                                # the speech path, frames of 1 and of 8 codebooks
#
# 2 layers of 128 with a 16-token attention window (the two reach 31 tokens back), 8 key-value pairs
# opening each 256-token sequence, keys and values from 128 tokens each, the keys coming back from
# token 47 on; MINUTES (default 7) of training each. Logs go to OUT (default runs/mqar), one a model.
set -u
what=${1:-main}
out=${2:-runs/mqar}
mkdir -p "$out"
C="--mqar 8 --seq_len 256 --window 16 --batch 64 --alphabet 256 --by_distance --device cuda --steps 1000000
   --max_minutes ${MINUTES:-7}"
EV="--eval_lens 1024,4096,16384,67500"
run() { name=$1; shift; python scripts/recall_toy.py $C "$@" > "$out/$name.log" 2>&1; echo "$name: exit $?"; }
main() {
    run window_only --separate_noise $EV --n_ttt 0 &
    run ttt_linear --separate_noise $EV --n_ttt 2 &
    run ttt_mlp --separate_noise $EV --n_ttt 2 --ttt_type mlp &
    run softmax_branch --separate_noise --eval_lens 1024,4096 --n_ttt 2 --memory softmax_attention_rope &
    run linear_attention --separate_noise --eval_lens 1024,4096 --n_ttt 2 --memory linear_attention &
    run ttt_linear_zero_fill $EV --n_ttt 2 &
}
variants() {
    run ttt_linear_seed1 --separate_noise $EV --n_ttt 2 --seed 1 &
    run ttt_linear_top_only --separate_noise $EV --n_ttt 1 &
    run ttt_linear_32_pairs --separate_noise $EV --n_ttt 2 --mqar 32 &
    run ttt_linear_train_1024 --separate_noise $EV --n_ttt 2 --seq_len 1024 --batch 16 &
    run ttt_linear_speech_path --separate_noise $EV --n_ttt 2 --frames --codebooks 8 --depth_layers 1 \
        --semantic_weight 100 &
    run window_only_speech_path --separate_noise --eval_lens 1024,4096 --n_ttt 0 --frames --codebooks 8 \
        --depth_layers 1 --semantic_weight 100 &
}
factors() {
    run ttt_linear_full_loss --separate_noise $EV --n_ttt 2 --mqar_full_loss &
    run ttt_linear_full_loss_zero_fill $EV --n_ttt 2 --mqar_full_loss &
    run ttt_linear_fill_from_pairs $EV --n_ttt 2 --mqar_fill_from_pairs &
    run ttt_linear_full_loss_fill_from_pairs $EV --n_ttt 2 --mqar_full_loss --mqar_fill_from_pairs &
    run softmax_branch_full_loss --separate_noise --eval_lens 1024,4096 --n_ttt 2 --memory softmax_attention_rope \
        --mqar_full_loss &
}
speech() {
    run text_path --separate_noise --eval_lens 1024 --n_ttt 2 &
    run speech_path_1_codebook --separate_noise --eval_lens 1024 --n_ttt 2 --frames --codebooks 1 --depth_layers 0 &
    run speech_path_8_codebooks --separate_noise --eval_lens 1024 --n_ttt 2 --frames --codebooks 8 --depth_layers 0 \
        --semantic_weight 100 &
    run speech_path_8_codebooks_depth_block --separate_noise --eval_lens 1024 --n_ttt 2 --frames --codebooks 8 \
        --depth_layers 1 --semantic_weight 100 &
}
case $what in
main) main ;;
speech) speech ;;
factors) factors ;;
variants) variants ;;
all) main; variants ;;
*) echo "usage: bash scripts/recall_mqar.sh main|variants|all|factors|speech [OUT]"; exit 2 ;;
esac
wait
for f in "$out"/*.log; do echo "== $f"; grep -v "^step" "$f" | tail -n 12; grep "^step" "$f" | tail -n 1; done
python scripts/plot_mqar.py "$out"/*.log --out "$out/recall_by_distance.png"
