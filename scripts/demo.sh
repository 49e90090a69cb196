#!/usr/bin/env bash
# The README's first command: set up, then the main job in demo/ (or $DEMO_DIR):
# train LeNet on Fashion-MNIST with consistency regularization, certify 100 test
# images, print the results table, export the smoothed classifier for TF Serving
# and answer one request through it. Running it again resumes or skips what is done.
#
# Its size can be made smaller (tests/demo_test.py does, since resuming does not
# depend on size): DEMO_TRAIN_FLAGS is appended to the training flags (say
# "--epochs=1 --train_examples=512"), DEMO_MAX images are certified (100) with
# DEMO_N samples each (10000), and the export samples DEMO_N too.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

py=.venv/bin/python
out=${DEMO_DIR:-demo}
model_dir="$out/fmnist_consistency_sigma0.50"
max=${DEMO_MAX:-100}
n=${DEMO_N:-10000}
tsv="$out/certify_n${n}_first${max}.tsv"

echo "== 1/4 train (3 epochs, 10,000 images${DEMO_TRAIN_FLAGS:+, then $DEMO_TRAIN_FLAGS}; TensorBoard: .venv/bin/tensorboard --logdir=$out)"
# shellcheck disable=SC2086  # DEMO_TRAIN_FLAGS is a list of flags.
"$py" bin/train.py --flagfile=configs/fashion_mnist_demo.flags ${DEMO_TRAIN_FLAGS:-} --model_dir="$model_dir"

echo "== 2/4 certify the first $max test images (n0 = 100, n = $n, alpha = 0.001)"
"$py" bin/certify.py --model_dir="$model_dir" --max="$max" --n0=100 --n="$n" --alpha=0.001 --output="$tsv"

echo "== 3/4 results"
"$py" bin/analyze.py "$tsv" --radii=0,0.25,0.5,0.75,1,1.25,1.5

echo "== 4/4 export for TF Serving and answer one request"
if [ ! -d "$out/serving/1" ]; then
  "$py" bin/export.py --model_dir="$model_dir" --export_dir="$out/serving" --version=1 --n0=100 --n="$n"
fi
"$py" bin/query.py --export_dir="$out/serving" --indices=0
