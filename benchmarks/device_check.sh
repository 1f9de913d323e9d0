#!/usr/bin/env bash
# The GPU checks of issue 12 as one short script, for a session that is lent a GPU machine.
#
#   bash benchmarks/device_check.sh prepare
#       here, with PyPI reachable: the wheels that the GPU machine's Python 3.12 lacks (zarr,
#       numcodecs, icechunk and their small needs) into .whl/, which git ignores.
#   bash benchmarks/device_check.sh run
#       there, through the device tool with .whl carried (`carry: [".whl"]`), from the repository
#       root; everything it measures lands in $OUT (or ./device-check when OUT is unset):
#       log.txt, pytest.txt, rebuild_bandwidth.json and .md.
#
# What it runs, each step under its own time limit (570 s in all: one device call of timeout_s 600):
#   1. the CUDA tests (tests that skip without a GPU, and the quantization and store tests);
#   2. a BERT-base scale zoo of 8 tasks (110M parameters, vocabulary 30522) generated there;
#   3. `benchmarks.rebuild_bandwidth` on CUDA: the ingest against one plain read pass of its
#      files (goal <= 1.5) and a task's rebuild, in bytes written per second, against the
#      device's own copy bandwidth (goal >= 0.5).
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "zarr==3.1.6" "numcodecs==0.16.6" "icechunk==1.1.21" "donfig==0.8.1.post1" "google-crc32c==1.9.0"
    ;;
run)
    out="${OUT:-device-check}"
    mkdir -p "$out"
    exec > >(tee "$out/log.txt") 2>&1
    ls .whl/*.whl >/dev/null || { echo "no wheels in .whl: run 'bash benchmarks/device_check.sh prepare' here and carry .whl"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 2
    status=0
    timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_quantize.py tests/test_store.py \
        tests/test_bf16_products.py tests/test_reconstruct.py tests/test_sparse_residual.py 2>&1 | tee "$out/pytest.txt" || status=1
    timeout 120 python3 -c "from benchmarks.scale import generate_zoo; print(generate_zoo('bert-base', 8, cache='/tmp/zoo').root)" || exit 1
    timeout 300 python3 -m benchmarks.rebuild_bandwidth --zoo /tmp/zoo/bert-base-T8-seed0 --tasks 8 --device cuda \
        --out "$out" || status=1
    exit $status
    ;;
*)
    echo "usage: bash benchmarks/device_check.sh prepare|run" >&2
    exit 2
    ;;
esac
