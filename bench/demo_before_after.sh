#!/usr/bin/env bash
# `make demo` end to end in two fresh clones, one after the other on the same machine:
# before = e08ff8e (main just before issue 11's first commit, 047993c: attention paths,
# batched decoding, fused AdamW, ...), after = main (or $AFTER). Each clone runs `make setup`
# first (not timed: pip downloads), then `make demo` is timed with every output line
# stamped by the seconds since it started, so each DVC stage's share can be read back.
#
#   bash bench/demo_before_after.sh            # run it on a quiet box: it takes ~30-40 min
#   BEFORE=e08ff8e AFTER=main OUT=/tmp/demo bash bench/demo_before_after.sh
#
# The DAG itself changed between the two revisions (select, evaluate on the test split,
# transposition, chords, ...), so the script also prints each stage's time: compare the
# stages both revisions have (train, tune, sweep) as well as the totals.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
before=${BEFORE:-e08ff8e}
after=${AFTER:-main}
out=${OUT:-$(mktemp -d -t demo-before-after-XXXX)}
mkdir -p "$out"
echo "clones and logs under $out"

for side in before after; do
    rev=$([ "$side" = before ] && echo "$before" || echo "$after")
    dir="$out/$side"
    rm -rf "$dir"
    git clone -q "$repo" "$dir"
    git -C "$dir" checkout -q "$rev"
    echo "== $side: $(git -C "$dir" log -1 --format='%h %ad %s' --date=iso | cut -c1-100)"
    (cd "$dir" && make setup >"$out/$side-setup.log" 2>&1) || {
        echo "error: make setup failed in $dir (see $out/$side-setup.log)"
        exit 1
    }
    echo "load average before make demo: $(cut -d' ' -f1-3 /proc/loadavg)"
    start=$(date +%s)
    (cd "$dir" && make demo 2>&1) | while IFS= read -r line; do
        printf '%5ds %s\n' "$(($(date +%s) - start))" "$line"
    done >"$out/$side-demo.log" || {
        echo "error: make demo failed in $dir (see $out/$side-demo.log)"
        exit 1
    }
    took=$(($(date +%s) - start))
    echo "$took" >"$out/$side-seconds"
    echo "make demo: ${took} s; load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "stage starts (seconds since make demo began):"
    grep -E "Running stage|Stage '.*' didn't change" "$out/$side-demo.log" | sed 's/^/  /' || true
done

b=$(cat "$out/before-seconds")
a=$(cat "$out/after-seconds")
echo "== make demo before ($before) ${b} s, after ($after) ${a} s: after/before = $(
    python3 -c "print(f'{$a / $b:.2f}')"
)x (same machine, one after the other; see the load averages above)"
