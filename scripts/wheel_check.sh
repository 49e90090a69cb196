#!/usr/bin/env bash
# The package as users get it: builds this checkout's wheel, installs it (not
# editable) with its dependencies into a fresh venv outside the checkout, and
# there, from a directory outside the checkout, runs
#   1. every installed command's --help (its own docstring and flags),
#   2. a tiny train -> certify -> analyze -> export -> query on Fashion-MNIST
#      (256 images, 1 epoch; 3 test images at n = 100), with the training
#      flagfile the wheel installs (share/tf_consreg/configs/), and analyze
#      once more as `python -m tf_consreg.commands.analyze`.
# .ci/run calls it; by hand: `bash scripts/wheel_check.sh` (PYTHON picks the
# interpreter, python3 by default; Fashion-MNIST must be installed, see
# scripts/setup.sh). Any failure stops it with "wheel_check: FAILED: ..." and
# a non-zero status. The wheel is built from the files git knows (committed,
# staged or new but not ignored) as they are in the working tree.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
COMMANDS=(analyze certify export predict query train tune)
# One flag each command defines, which its --help must list.
declare -A OWN_FLAG=([analyze]=radii [certify]=n0 [export]=export_dir [predict]=skip [query]=rest [train]=lbd
                     [tune]=tuning_dir)

fail() {
  echo "wheel_check: FAILED: $*" >&2
  exit 1
}

# Nothing may make the checkout's tf_consreg importable: the commands must run from the wheel.
unset PYTHONPATH
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS
step() { echo "wheel_check: [$((SECONDS - start)) s] $*"; }

step "building the wheel in $work (from a copy of the checkout: a build writes build/ and *.egg-info)"
mkdir "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$work/src"
"$PYTHON" -m venv "$work/venv"
venv=$work/venv
"$venv/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src"
wheels=("$work"/dist/tf_consreg-*.whl)
[ -f "${wheels[0]}" ] || fail "pip wheel wrote no tf_consreg wheel into $work/dist"

step "installing ${wheels[0]##*/} and its dependencies into a fresh venv"
# --no-compile: byte-compiling every installed file (all of TensorFlow) more than doubled the install (406 s
# with it, 174 s without, on a 2-core AMD EPYC at load 18-27); the commands compile what they import on first use.
"$venv/bin/python" -m pip install --quiet --no-compile "${wheels[0]}"

mkdir "$work/run"
cd "$work/run"
export PATH="$venv/bin:$PATH"
installed=$(python -c "import tf_consreg; print(tf_consreg.__file__)")
case "$installed" in
  "$venv"/lib/*/site-packages/tf_consreg/__init__.py) ;;
  *) fail "tf_consreg is imported from $installed, not from the venv's site-packages" ;;
esac
configs=$venv/share/tf_consreg/configs
[ -f "$configs/fashion_mnist_demo.flags" ] || fail "the wheel installed no $configs/fashion_mnist_demo.flags"

step "--help of every command, side by side (each one imports TensorFlow)"
for name in "${COMMANDS[@]}"; do
  command -v "tf-consreg-$name" >/dev/null || fail "the wheel installed no command tf-consreg-$name"
  (status=0; "tf-consreg-$name" --help >"help.$name.txt" 2>"help.$name.err" || status=$?; echo "$status" >"help.$name.status") &
done
wait
for name in "${COMMANDS[@]}"; do
  # absl's --help exits with status 1 after printing the help.
  status=$(cat "help.$name.status")
  [ "$status" -le 1 ] || fail "tf-consreg-$name --help: status $status: $(tail -3 "help.$name.err")"
  # The docstring's first line, read from the installed module without importing it.
  first=$(python - "$name" <<'EOF'
import ast, importlib.util, sys
origin = importlib.util.find_spec(f"tf_consreg.commands.{sys.argv[1]}").origin
print(ast.get_docstring(ast.parse(open(origin, encoding="utf-8").read())).splitlines()[0])
EOF
)
  [ "$(head -1 "help.$name.txt")" = "$first" ] ||
    fail "tf-consreg-$name --help begins '$(head -1 "help.$name.txt")', not its docstring"
  grep -q -- "^  --${OWN_FLAG[$name]}:" "help.$name.txt" || fail "tf-consreg-$name --help lists no --${OWN_FLAG[$name]}"
done

step "tf-consreg-train: 1 epoch on 256 Fashion-MNIST images"
tf-consreg-train --flagfile="$configs/fashion_mnist_demo.flags" --epochs=1 --train_examples=256 --eval_examples=0 \
  --model_dir=model || fail "tf-consreg-train: status $?"
[ -f model/base_model.keras ] || fail "tf-consreg-train wrote no model/base_model.keras"

step "tf-consreg-certify: 3 test images, n0 = 10, n = 100"
tf-consreg-certify --model_dir=model --max=3 --n0=10 --n=100 --alpha=0.001 --batch_size=100 --output=certify.tsv ||
  fail "tf-consreg-certify: status $?"
rows=$(grep -cvE '^(#|idx)' certify.tsv || true)
[ "$rows" = 3 ] || fail "certify.tsv holds $rows rows, expected 3"

step "tf-consreg-analyze, and python -m tf_consreg.commands.analyze"
tf-consreg-analyze certify.tsv --radii=0,0.25 >analyze.txt || fail "tf-consreg-analyze: status $?"
python -m tf_consreg.commands.analyze certify.tsv --radii=0,0.25 >analyze_m.txt ||
  fail "python -m tf_consreg.commands.analyze: status $?"
[ -s analyze.txt ] && cmp -s analyze.txt analyze_m.txt ||
  fail "tf-consreg-analyze and python -m tf_consreg.commands.analyze disagree or print nothing"
cat analyze.txt

step "tf-consreg-export: version 1, n0 = 10, n = 100"
tf-consreg-export --model_dir=model --export_dir=serving --version=1 --n0=10 --n=100 --batch_size=100 ||
  fail "tf-consreg-export: status $?"
[ -f serving/1/saved_model.pb ] || fail "tf-consreg-export wrote no serving/1/saved_model.pb"

step "tf-consreg-query: test image 0 through the export"
tf-consreg-query --export_dir=serving --indices=0 >query.txt || fail "tf-consreg-query: status $?"
[ -s query.txt ] || fail "tf-consreg-query printed nothing"
cat query.txt

step "passed: the wheel's ${#COMMANDS[@]} commands run from a fresh venv outside the checkout"
