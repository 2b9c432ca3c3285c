#!/usr/bin/env bash
# Every GPU run whose policy summaries time all six choices at all seven batch buckets, in turn:
# bash run_worlds.sh [replay_policy.py's options]
cd "$(dirname "$0")"
while read -r world; do
  echo "== $world"
  python3 replay_policy.py traces.json.gz "$world" "$@"
done < worlds.txt
