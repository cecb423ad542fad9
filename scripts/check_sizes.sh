#!/usr/bin/env bash
# Model files stay small enough to read in one sitting: fail on any Python file over 800 lines in libra_model/.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
while IFS= read -r -d '' file; do
  lines=$(wc -l < "$file")
  if [ "$lines" -gt 800 ]; then
    echo "$file has $lines lines (limit 800): split it" >&2
    status=1
  fi
done < <(find libra_model -name '*.py' -print0)
exit $status
