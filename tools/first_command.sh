#!/usr/bin/env bash
# Time the README's first command as a newcomer runs it: a fresh clone of this repository in a new temporary
# folder, then the command exactly as the README writes it (setup included), under /usr/bin/time -v.
# Prints the summary it ends with and the wall time and peak memory.
#   bash tools/first_command.sh [CLONE_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$(mktemp -d)/graphpress}
git clone -q "$repo" "$dir"
cd "$dir"
# the first command is the first line after "# 1." in the README's bash block
cmd=$(awk '/^# 1\./{found=1; next} found && /^[^#]/ {print; exit}' README.md)
echo "clone: $dir"
echo "command: $cmd"
COLUMNS=80 /usr/bin/time -v bash -c "$cmd" > first_command.out 2> first_command.time || { cat first_command.time; exit 1; }
cat first_command.out
grep -E "Elapsed|Maximum resident" first_command.time
