#!/usr/bin/env bash
# The wheel works outside the repository: build it, install it into a fresh venv in a temp dir, run
# `feature-circuits discover` on the embedded default from a directory outside the checkout, and
# check the circuit it wrote (load_circuit + the packaged JSON Schema).
#
# The fresh venv does not reinstall torch & co.: it gets the repository venv's site-packages as a
# plain sys.path entry (a .pth line). A plain path entry does not execute that directory's own .pth
# files, so the editable install of feature_circuits there (its __editable__ finder) stays invisible;
# the script checks that feature_circuits, its model, SAEs and schema all come from the fresh venv.
#
# Usage: bash .ci/wheel_check.sh   (after `make install`; VENV=... to use another repository venv)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY="${VENV:-$REPO/.venv}/bin/python"
start=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fc-wheel.XXXXXX")
had_build=$([ -e "$REPO/build" ] && echo 1 || echo 0)   # setuptools builds in ./build: leave no trace
trap 'rm -rf "$WORK"; [ "$had_build" = 1 ] || rm -rf "$REPO/build"' EXIT

# 1. build (no isolation: the venv's setuptools, no network)
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation . -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/feature_circuits-*.whl)
echo "wheel-check: built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

# 2. the package data travels with it
listing=$(unzip -l "$WHEEL")
for f in feature_circuits/circuit/circuit.schema.json \
         feature_circuits/toy/model/model.safetensors feature_circuits/toy/model/config.json \
         feature_circuits/toy/model/tokenizer.json feature_circuits/toy/MODEL_CARD.md \
         feature_circuits/toy/data/sva_rc_train.jsonl feature_circuits/toy/data/ioi_test.jsonl; do
  grep -q " $f\$" <<<"$listing" || { echo "wheel-check: $f is missing from the wheel" >&2; exit 1; }
done
n_saes=$(grep -c 'feature_circuits/toy/saes/.*/ae\.safetensors$' <<<"$listing" || true)
[ "$n_saes" -gt 0 ] || { echo "wheel-check: no SAE (toy/saes/**/ae.safetensors) in the wheel" >&2; exit 1; }
if grep -qE ' (tests|experiments|scripts)/' <<<"$listing"; then
  echo "wheel-check: the wheel carries files from outside feature_circuits/" >&2; exit 1
fi
echo "wheel-check: package data present ($n_saes SAEs)"

# 3. a fresh venv outside the repository, the wheel without deps, the deps through a .pth line
"$PY" -m venv "$WORK/venv"
FRESH="$WORK/venv/bin/python"
"$FRESH" -m pip install --quiet --no-deps --no-index "$WHEEL"
repo_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
fresh_site=$("$FRESH" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$repo_site" > "$fresh_site/zz_repo_venv_deps.pth"

# 4. run the console script from outside the checkout, with nothing pointing at the repository
mkdir "$WORK/run"
cd "$WORK/run"
unset PYTHONPATH
"$WORK/venv/bin/feature-circuits" discover --out out

# 5. the circuit is valid, and everything came from the fresh venv
"$FRESH" - "$REPO" "$WORK/venv" <<'EOF'
import json
import sys
from importlib.resources import files
from pathlib import Path

import jsonschema

import feature_circuits
from feature_circuits import toy
from feature_circuits.circuit import load_circuit

repo, venv = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
here = Path(feature_circuits.__file__).resolve()
assert here.is_relative_to(venv), f"feature_circuits imported from {here}, not from the fresh venv {venv}"
for p in (toy.MODEL_DIR, toy.SAE_ROOT, toy.DATA_DIR):
    assert Path(p).resolve().is_relative_to(venv), f"{p} is not package data of the installed wheel"
editable = [m for m in sys.modules if m.startswith("__editable__")]
assert not editable, f"the repository's editable install is active in the fresh venv: {editable}"
leaked = [p for p in sys.path if p and Path(p).resolve().is_relative_to(repo) and "site-packages" not in p]
assert not leaked, f"the repository is on sys.path: {leaked}"
circuit = load_circuit(Path("out/circuit.json"))
schema = json.loads(files("feature_circuits.circuit").joinpath("circuit.schema.json").read_text())
jsonschema.validate(json.loads(Path("out/circuit.json").read_text()), schema)
assert Path("out/circuit.html").is_file(), "discover wrote no circuit.html"
print(f"wheel-check: valid circuit.json ({len(circuit.nodes)} nodes, {len(circuit.edges)} edges) "
      f"from {here.parent}")
EOF
echo "wheel-check: ok in $(( $(date +%s) - start )) s"
