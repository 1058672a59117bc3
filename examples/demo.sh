#!/usr/bin/env bash
# The whole StABlE story on built-in data, on a laptop-class CPU (about 10-15 minutes):
#   1. QM reference data: Langevin MD of ethanol at 700 K with GFN2-xTB (no download)
#   2. pre-train a small SchNet on a few frames: a fragile model, whose replicas fail often
#   3. simulate 64 replicas with it from held-out frames: how long do they stay stable?
#   4. StABlE-refine it (Boltzmann estimator on h(r), energy/force regulariser)
#   5. simulate again with the same starts and seeds
#   6. compare: survival, medians with bootstrap intervals, the log-rank test, h(r) and force errors
# Every step is a plain `openmm-stable` command; OUT (default demo_output) holds the results.
# If refinement does not make the model significantly more stable, the comparison says so.
set -euo pipefail
OUT=${OUT:-demo_output}
HERE=$(cd "$(dirname "$0")" && pwd)
REPLICAS=${REPLICAS:-64}
SIM_PS=${SIM_PS:-4}
mkdir -p "$OUT"

step() { printf '\n=== %s\n' "$*"; }
# A rerun continues what an earlier (possibly killed) run left: --resume where a stage left its state.
resume_if() { [ -e "$1" ] && echo --resume || true; }

step "1/6 reference data: GFN2-xTB ethanol, 700 K (hot: small models fail within picoseconds)"
if [ ! -f "$OUT/ethanol_xtb.npz" ]; then
  openmm-stable data generate --molecule ethanol --frames 700 --stride 10 --temperature 700 \
    --out "$OUT/ethanol_xtb.npz"
fi
# 50 frames to learn from, 200 held out (replica starts and test set), the rest unused.
openmm-stable data split "$OUT/ethanol_xtb.npz" --train 50 --val 0 --test 200 --mode random \
  --out-prefix "$OUT/ethanol"
openmm-stable data info "$OUT/ethanol_train.npz"

step "2/6 pre-train a small SchNet on 40 frames (+10 for validation): a fragile start"
openmm-stable pretrain "$OUT/ethanol_train.npz" --out "$OUT/pretrain" --architecture schnet --preset small \
  --train 40 --val 10 --test 0 --time-budget "${PRETRAIN_MIN:-2}" \
  $( [ -f "$OUT/pretrain/checkpoint_last.pt" ] && echo --resume )

step "3/6 simulate the pre-trained model: $REPLICAS replicas from held-out frames, 700 K"
openmm-stable simulate "$OUT/pretrain/model.pt" --data "$OUT/ethanol_test.npz" --reference "$OUT/ethanol_xtb.npz" \
  --test-data "$OUT/ethanol_test.npz" --replicas "$REPLICAS" --time "$SIM_PS" --vacf-interval 0 \
  --out "$OUT/simulate_pretrained" $(resume_if "$OUT/simulate_pretrained/progress.json")

step "4/6 StABlE refinement ($HERE/refine_demo.yaml)"
openmm-stable refine "$OUT/pretrain/model.pt" --data "$OUT/ethanol_train.npz" --reference "$OUT/ethanol_xtb.npz" \
  --config "$HERE/refine_demo.yaml" --out "$OUT/refine" $(resume_if "$OUT/refine/checkpoint.pt")

step "5/6 simulate the refined model: the same starts and seeds"
openmm-stable simulate "$OUT/refine/model.pt" --data "$OUT/ethanol_test.npz" --reference "$OUT/ethanol_xtb.npz" \
  --test-data "$OUT/ethanol_test.npz" --replicas "$REPLICAS" --time "$SIM_PS" --vacf-interval 0 \
  --out "$OUT/simulate_refined" $(resume_if "$OUT/simulate_refined/progress.json")

step "6/6 before / after"
openmm-stable compare pretrained="$OUT/simulate_pretrained" refined="$OUT/simulate_refined" --out "$OUT/compare"
echo "learning curves: $OUT/pretrain/learning_curve.png, $OUT/refine/learning_curves.png"
