#!/usr/bin/env bash
# Check the packaged tool as a user gets it: build the wheel from this working tree, install it
# with its dependencies into a fresh virtual environment (scripts/setup.sh, so torch is the
# CPU build on a machine without a GPU), and run the demo with one searched trial from a folder
# outside the source tree.  It uses the shipped smoke space, which only package data provides
# there.  Everything lives in a temporary folder, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

repo=$PWD
t0=$SECONDS
mkdir "$work/src"  # a clean copy of the working tree: no build/ or .egg-info left from before
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} find {} -maxdepth 0 -type f -print0 \
  | tar -c --null -T - | tar -x -C "$work/src"
(cd "$work/src" && "$repo/.venv/bin/python" -m pip --disable-pip-version-check wheel -q --no-deps \
  --no-build-isolation -w "$work/dist" . 2>&1 | { grep -v "is ignored: it is neither" || true; })
wheel=$(echo "$work"/dist/pgps_tune-*.whl)
PGPS_VENV="$work/venv" bash scripts/setup.sh "$wheel"
echo "check_wheel: built $(basename "$wheel") and installed it in a fresh environment in $((SECONDS - t0)) s"

t0=$SECONDS
mkdir "$work/run"
cd "$work/run"
unset PYTHONPATH
"$work/venv/bin/python" -c 'import pgps_tune, sys; assert pgps_tune.__file__.startswith(sys.prefix), pgps_tune.__file__'
"$work/venv/bin/pgps-tune" demo --out sweep --num-samples 1 --cache-dir "$work/cache" --results-store "$work/store"
test -s sweep/best_schedule.yaml && test -s sweep/trials.parquet && test -s sweep/summary.json
echo "check_wheel: the demo ran from the wheel outside the source tree in $((SECONDS - t0)) s"
