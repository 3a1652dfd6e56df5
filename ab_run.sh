set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:. PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 BENCH_COMMIT=$(git rev-parse --short HEAD)
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 250 > $OUT/clocks.csv 2>&1 &
SMI=$!
date +%T > $OUT/marks.txt
python3 bench/serving_bench.py --models 8b,1b --concurrency 1,64,256 --no-baseline --prefix-concurrency 0 --out $OUT > $OUT/sb_main.log 2>&1
date +%T >> $OUT/marks.txt
for m in 1024 512; do
python3 bench/serving_bench.py --models 8b --concurrency 64 --no-baseline --prefix-concurrency 0 --no-profile --neuron-arg=--max-batched-tokens=$m --out $OUT > $OUT/sb_mbt$m.log 2>&1
date +%T >> $OUT/marks.txt
done
python3 bench/serving_bench.py --models 1b,8b --concurrency 64,256 --no-baseline --prefix-concurrency 0 --no-profile --cortex-arg=--stream-interval=2 --out $OUT > $OUT/sb_si2.log 2>&1
date +%T >> $OUT/marks.txt
python3 bench/stream_cost_bench.py --device 0 --shape 1b --streams 256 --runs 1 --out $OUT > $OUT/sc_spin.log 2>&1
mkdir -p /tmp/blocking && cat > /tmp/blocking/sitecustomize.py <<'PY'
import functools
import cupy
cupy.cuda.Event = functools.partial(cupy.cuda.Event, block=True)
PY
PYTHONPATH=/tmp/blocking:$PYTHONPATH python3 bench/stream_cost_bench.py --device 0 --shape 1b --streams 256 --runs 1 --out $OUT > $OUT/sc_block.log 2>&1
date +%T >> $OUT/marks.txt
kill $SMI
ls $OUT
