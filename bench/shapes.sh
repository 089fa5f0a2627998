#!/usr/bin/env bash
# bash bench/shapes.sh SHAPE [more `python -m bench` arguments]
#
# Issue 27 on the lent GPU machine, one call per line of the sequence in docs/log.md ("Open: issue 27"): a
# shape's arms (python -m bench --shape SHAPE) under a time limit that ends them before the call's own
# (BENCH_LIMIT_S, 520 s: the arm running then is stopped, what the others measured is kept), then its files
# copied to $OUT. Every call adds its shape's objects to one <date>-shapes.json in BENCH_RESULTS
# (/tmp/bench-results, kept while the machine stays warm), and a second call of a shape of the same commit
# adds its arms to the first's (--append). SHAPE: 0.5b, 0.5b_lora, 1.5b, 7b_lora. Needs BENCH_COMMIT (the
# copied tree has no .git) and the bundle's environment (source /tmp/site/gpu-env.sh).
#
#   BENCH_COMMIT=abc1234 bash bench/shapes.sh 1.5b
#   BENCH_COMMIT=abc1234 bash bench/shapes.sh 7b_lora --prepare-only      # build the 7B model, then stop
#   BENCH_COMMIT=abc1234 bash bench/shapes.sh 7b_lora --arms ours_default_lora
set -euo pipefail

shape=${1:?"usage: bash bench/shapes.sh 0.5b|0.5b_lora|1.5b|7b_lora [python -m bench arguments]"}
shift
: "${BENCH_COMMIT:?set BENCH_COMMIT to the commit of this tree (git rev-parse --short HEAD where it has .git)}"
export BENCH_COMMIT
results=${BENCH_RESULTS:-/tmp/bench-results}
out=${OUT:-$results}
work=/tmp/bench-${shape%_lora}  # 0.5b and 0.5b_lora share their model and prompts
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}"
mkdir -p "$results" "$out"

append=()
if compgen -G "$results/????-??-??-$BENCH_COMMIT-$shape.json" > /dev/null; then
    append=(--append)
fi
started=$(date +%s)
status=0
limit=${BENCH_LIMIT_S:-520}
# the bench stops its arms 20 s before the limit itself (TRL's sweep keeps the candidates it measured);
# timeout is the backstop
timeout --signal=TERM $((limit + 30)) python -m bench --shape "$shape" --workdir "$work" --out "$results" \
    --time-limit-s "$limit" "${append[@]}" "$@" || status=$?
echo "shapes.sh: $shape took $(( $(date +%s) - started )) s, exit $status"

# at most 8 files come back from a call: the shape's results, the shapes file, TRL's sweep as far as it got,
# the ends of the arms' logs
if [ "$out" != "$results" ]; then
    for file in "$results"/*-"$BENCH_COMMIT"*-"$shape".json "$results"/*-"$BENCH_COMMIT"*-"$shape".md \
        "$results"/????-??-??-shapes.json; do
        if [ -e "$file" ]; then cp "$file" "$out/"; fi
    done
    for sweep in "$work"/trl_tuned*.sweep.json; do
        if [ -e "$sweep" ]; then cp "$sweep" "$out/$shape-$(basename "$sweep")"; fi
    done
    for log in "$work"/*.log; do
        if [ -e "$log" ]; then echo "== $log"; tail -n 60 "$log"; fi
    done > "$out/$shape-logs.txt"
fi
python - "$results" <<'EOF'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/????-??-??-shapes.json"))[-1:]:
    print(f"{'shape':8} {'arm':16} {'s/step':>7} {'peak GiB':>8} {'MFU':>6} {'sync+sleep':>10} {'x tuned':>7} {'x anchor':>8}")
    for e in json.load(open(path)):
        def show(key, spec):
            return "-" if e.get(key) is None else format(e[key], spec)
        print(f"{e['shape']:8} {e['arm']:16} {show('median_step_s', '7.2f')} {show('peak_mem_gib', '8.1f')} "
              f"{show('train_mfu', '6.1%')} {show('sync_sleep_share', '10.1%')} {show('ratio_vs_trl_tuned', '7.2f')} "
              f"{show('ratio_vs_trl_anchor', '8.2f')}")
EOF
exit "$status"
