#!/usr/bin/env bash
# The GPU test files in N parallel pytest processes.  Each forward test compiles its kernels
# (~20 s of Numba + ptxas, CPU-bound), so run serially the GPU suite takes longer than one device
# call allows; shards on a 16-core machine take ~2.5 min.  Ids are read line by line: the
# parametrized ones contain spaces.
#   N=6 bash tests/run_gpu_shards.sh            # all shards, results in $OUT (default: /tmp)
#   N=6 SHARDS="ab ad" bash tests/run_gpu_shards.sh   # rerun two shards (the split is deterministic)
# The kernel cache is filled first (numba_fa3.precompile on every core; PRECOMPILE=0 skips it).
# Then tests/sanitize.py (every kernel specialization under compute-sanitizer's four tools; summary
# in $OUT/sanitize.txt and .json), which counts in the exit status: SANITIZE=0 skips it,
# SANITIZE_ARGS passes it options (e.g. "--quick", "--tools racecheck"), TS bounds it (seconds).
set -u
N=${N:-6}
OUT=${OUT:-/tmp}
FILES=${FILES:-"tests/test_forward.py tests/test_smem.py tests/test_tile_order.py tests/test_fragment.py tests/test_gemm.py tests/test_host.py tests/test_scheduler.py tests/test_robustness.py tests/test_dlpack.py tests/test_kernel_cache.py tests/test_first_use.py tests/test_backward.py tests/test_backward_prep.py tests/test_torch.py"}
# Every specialization the tests build, compiled once into the kernel cache on all cores first
# (PRECOMPILE=0 skips it): the shards would otherwise compile the same kernels side by side.
if [ "${PRECOMPILE:-1}" != 0 ]; then
  timeout "${TP:-600}" python -m numba_fa3.precompile --softcap --varlen --backward --gemm --jobs "$(nproc)" \
    > "$OUT/precompile.txt" 2>&1 || echo "precompile: $(tail -1 "$OUT/precompile.txt")"
fi
ids=$(mktemp -d)
python -m pytest --collect-only -q -p no:cacheprovider $FILES 2>/dev/null | grep "::" > "$ids/all"
echo "$(wc -l < "$ids/all") tests in $N shards"
split -n "r/$N" "$ids/all" "$ids/shard_"
run() { mapfile -t t < "$1"; timeout "${T:-540}" python -m pytest -q -p no:cacheprovider "${t[@]}" > "$OUT/$(basename "$1").txt" 2>&1; }
for f in "$ids"/shard_*; do
  s=${f##*/shard_}
  if [ -z "${SHARDS:-}" ] || [[ " $SHARDS " == *" $s "* ]]; then run "$f" & fi
done
wait
status=0
for f in "$OUT"/shard_*.txt; do
  line=$(grep -E "passed|failed|error" "$f" | tail -1)
  echo "${f##*/}: ${line:-no summary (timed out?)}"
  [[ "$line" == *passed* && "$line" != *failed* && "$line" != *error* ]] || status=1
done
if [ "${SANITIZE:-1}" != 0 ]; then
  timeout "${TS:-3000}" python tests/sanitize.py --out "$OUT/sanitize.json" ${SANITIZE_ARGS:-} > "$OUT/sanitize.txt" 2>&1 || status=1
  echo "$(tail -1 "$OUT/sanitize.txt")"
fi
exit $status
