#!/bin/bash
cd "$(dirname "$0")/../.."  # the repository root
B=./target/release/splitserve
C='--arms disaggregated --big-interval-s 1 --big-prompts 6 --prefill-args --long-prefill-token-threshold=64'
for r in 1 2 3; do
  echo -n "default r$r "; $B bench pd $C --out /tmp/ab-d$r 2>&1 | grep '^| disagg'
  echo -n "idle+bind r$r "; $B bench pd $C --cpu-bind 0-1 --serve-args "--compute-priority idle" --out /tmp/ab-ib$r 2>&1 | grep '^| disagg'
  echo -n "bind r$r "; $B bench pd $C --cpu-bind 0-1 --out /tmp/ab-b$r 2>&1 | grep '^| disagg'
  echo -n "idle r$r "; $B bench pd $C --serve-args "--compute-priority idle" --out /tmp/ab-i$r 2>&1 | grep '^| disagg'
done
echo done
