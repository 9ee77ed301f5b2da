#!/usr/bin/env bash
# The GPU check in one go: the gpu-marked tests, then the speed benchmark on CUDA, everything on
# stdout. Run from anywhere on a GPU machine with torch and the project installed
#     pip install torch && pip install -e '.[test]'
# or, where the machine has CUDA torch but no network (the lent machines), with the wheels that
# `python benchmarks/device_wheels.py` gathers into .whl/ here: they are installed first, and the
# project runs from this tree. PYTHON names the interpreter (default: python3).
# Exit status: the tests' when they fail, else the benchmark's (a missing benchmark is reported,
# not a failure); 2 when torch sees no GPU, since every gpu test would then be skipped; 3 when the
# carried wheels do not install. Arguments go to the benchmark (e.g. --runs FILE, which keeps each
# configuration's run as it ends: compile comes last, and a call cut off at its limit keeps the rest).
#
# On a lent machine, through the device tool (one call; about 78 GiB is plenty):
#     python benchmarks/device_wheels.py          # here, once: .whl/, 37 MiB
#     run(command="bash benchmarks/gpu_check.sh --runs $OUT/runs.jsonl | tee $OUT/gpu_check.log",
#         carry=[".whl"], timeout_s=540)
set -uo pipefail
exec 2>&1
export PYTHONUNBUFFERED=1  # what ran is in the log even if the call is cut off
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [ -d .whl ]; then
    echo "== installing the carried wheels (.whl/); the project runs from this tree"
    # Named wheels replace the machine's versions; what they need comes from the machine, or from .whl.
    "$py" -m pip install -q --no-index --find-links .whl --no-compile --disable-pip-version-check .whl/*.whl || exit 3
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# The tests' CPU references run beside the GPU; conftest would otherwise pin them to one thread.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 4)}"

echo "== environment"
"$py" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB, sm {props.major}{props.minor}")
print("mps available:", torch.backends.mps.is_available())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv

# PASD_TEST_GPU_DEVICE=cpu (see tests/test_devices.py) runs the whole check on the CPU, to check it.
device=${PASD_TEST_GPU_DEVICE:-$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else '')")}
if [ -z "$device" ]; then
    echo "error: torch sees neither CUDA nor MPS; the gpu tests would all be skipped"
    exit 2
fi

echo
echo "== gpu tests: python -m pytest -m gpu -q"
"$py" -m pytest -m gpu -q -rs --durations=15
tests_status=$?

echo
bench_status=0
if [ "$device" != "cuda" ]; then
    echo "== speed benchmark: skipped (it runs with --device cuda; this machine has $device)"
elif [ ! -f benchmarks/bench_speed.py ]; then
    echo "== speed benchmark: benchmarks/bench_speed.py is not in this tree; nothing to run"
else
    echo "== speed benchmark: python benchmarks/bench_speed.py --device cuda $*"
    "$py" benchmarks/bench_speed.py --device cuda "$@"
    bench_status=$?
fi

echo
echo "== gpu tests exit status $tests_status, benchmark exit status $bench_status"
if [ "$tests_status" -ne 0 ]; then
    exit "$tests_status"
fi
exit "$bench_status"
