#!/usr/bin/env bash
# One-command accelerator benchmark (see benchmarks/accelerator.py): runs it from the repository root and keeps
# the JSON in accelerator-<host>-<time>.json beside the printed copy. Extra arguments go to the script, e.g.
#   bash benchmarks/accelerator.sh --smoke          # tiny sizes, any machine
#   bash benchmarks/accelerator.sh --data /data/ytf_shards
set -euo pipefail
cd "$(dirname "$0")/.."
output="accelerator-$(hostname)-$(date +%Y%m%d-%H%M%S).json"
python benchmarks/accelerator.py --output "$output" "$@"
echo "saved $output" >&2
