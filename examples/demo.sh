#!/usr/bin/env bash
# The whole StABlE story on built-in data, on a laptop-class CPU (about 15 minutes):
#   1. QM reference data: Langevin MD of aspirin at 500 K with GFN2-xTB (no download)
#   2. pre-train a small SchNet on energies and forces
#   3. simulate replicas with it: how long do they stay stable?
#   4. StABlE-refine it (Boltzmann estimator on h(r), energy/force regulariser)
#   5. simulate again and compare before/after (stable time, h(r) error, force MAE)
# Every step is a plain `openmm-stable` command; OUT (default demo_output) holds the results.
set -euo pipefail
OUT=${OUT:-demo_output}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"

step() { printf '\n=== %s\n' "$*"; }

step "1/6 reference data: GFN2-xTB aspirin, 500 K"
if [ ! -f "$OUT/aspirin_xtb.npz" ]; then
  openmm-stable data generate --molecule aspirin --frames 700 --stride 10 --temperature 500 \
    --out "$OUT/aspirin_xtb.npz"
fi
openmm-stable data split "$OUT/aspirin_xtb.npz" --train 500 --val 100 --test 100 --mode random \
  --out-prefix "$OUT/aspirin"
openmm-stable data info "$OUT/aspirin_train.npz"

step "2/6 pre-train a small SchNet on 500 frames (energies + forces)"
openmm-stable pretrain "$OUT/aspirin_train.npz" --out "$OUT/pretrain" --architecture schnet --preset small \
  --train 0.8 --val 0.2 --test 0 --time-budget "${PRETRAIN_MIN:-3}" \
  $( [ -f "$OUT/pretrain/checkpoint_last.pt" ] && echo --resume )

step "3/6 simulate the pre-trained model: 16 replicas, 500 K"
openmm-stable simulate "$OUT/pretrain/model.pt" --data "$OUT/aspirin_train.npz" --reference "$OUT/aspirin_xtb.npz" \
  --test-data "$OUT/aspirin_test.npz" --replicas 16 --time "${SIM_PS:-2}" --out "$OUT/simulate_pretrained"

step "4/6 StABlE refinement"
openmm-stable refine "$OUT/pretrain/model.pt" --data "$OUT/aspirin_train.npz" --reference "$OUT/aspirin_xtb.npz" \
  --config "$HERE/refine_demo.yaml" --out "$OUT/refine" --resume

step "5/6 simulate the refined model"
openmm-stable simulate "$OUT/refine/model.pt" --data "$OUT/aspirin_train.npz" --reference "$OUT/aspirin_xtb.npz" \
  --test-data "$OUT/aspirin_test.npz" --replicas 16 --time "${SIM_PS:-2}" --out "$OUT/simulate_refined"

step "6/6 before / after"
openmm-stable compare pretrained="$OUT/simulate_pretrained" refined="$OUT/simulate_refined" --out "$OUT/compare"
echo "learning curves: $OUT/pretrain/learning_curve.png, $OUT/refine/learning_curves.png"
