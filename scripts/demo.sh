#!/usr/bin/env bash
# The README's first command: set up, then the main job in demo/ (or $DEMO_DIR):
# train LeNet on Fashion-MNIST with consistency regularization, certify 100 test
# images, print the results table, export the smoothed classifier for TF Serving
# and answer one request through it. Running it again resumes or skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

py=.venv/bin/python
out=${DEMO_DIR:-demo}
model_dir="$out/fmnist_consistency_sigma0.50"
tsv="$out/certify_n10000_first100.tsv"

echo "== 1/4 train (3 epochs, 10,000 images; TensorBoard: .venv/bin/tensorboard --logdir=$out)"
"$py" bin/train.py --flagfile=configs/fashion_mnist_demo.flags --model_dir="$model_dir"

echo "== 2/4 certify the first 100 test images (n0 = 100, n = 10,000, alpha = 0.001)"
"$py" bin/certify.py --model_dir="$model_dir" --max=100 --n0=100 --n=10000 --alpha=0.001 --output="$tsv"

echo "== 3/4 results"
"$py" bin/analyze.py "$tsv" --radii=0,0.25,0.5,0.75,1,1.25,1.5

echo "== 4/4 export for TF Serving and answer one request"
if [ ! -d "$out/serving/1" ]; then
  "$py" bin/export.py --model_dir="$model_dir" --export_dir="$out/serving" --version=1 --n0=100 --n=10000
fi
"$py" bin/query.py --export_dir="$out/serving" --indices=0
