"""Wheels for a GPU machine that cannot reach a package index, from this environment's versions.

    python benchmarks/device_wheels.py                    # -> .whl/, for CPython 3.12 on x86-64 Linux
    python benchmarks/device_wheels.py --python 3.11 --dest /tmp/w

The lent GPU machines have CUDA torch and much else, but no diffusers, older huggingface_hub and
transformers, and no network. This takes every package that `pasd[test]` needs in this
environment, at the version installed here, less torch and what only torch needs (the machine's
own CUDA build serves) and the large ones the machine already has at versions that do, and
downloads each for the target Python with pip. `benchmarks/gpu_check.sh` installs a `.whl/` folder
in the tree's root (`.gitignore`d) before anything else; the device tool carries it with
`carry: [".whl"]`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# The machine's own builds serve: torch is built against its numpy and CUDA.
LEFT_OUT = {"torch", "numpy", "triton", "setuptools", "pip", "wheel"}
# On the machine at versions that do (KINDS.md), and large: the tree and the wheels travel within 64 MiB.
ON_THE_MACHINE = {"pillow", "safetensors", "pygments", "pyyaml"}  # not tokenizers: 0.23.2 wants hub < 2
# Checks of the code, not needed to run it.
DEV_TOOLS = {"ruff", "mypy", "import-linter"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "pasd", extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
    """Name -> installed version of everything `root[extras]` needs here, transitively."""
    found: dict[str, str] = {}
    pending = [(root, extras)]
    while pending:
        name, wanted = pending.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # a requirement of another platform or Python, not installed here
        key = canonical(dist.metadata["Name"])
        if key in found and not wanted:
            continue
        found[key] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in ("", *wanted)):
                continue
            child = canonical(requirement.name)
            if child in LEFT_OUT or child in DEV_TOOLS or child in found:
                continue
            pending.append((requirement.name, tuple(requirement.extras)))
    found.pop(canonical(root), None)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (KINDS.md: 3.12)")
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = parser.parse_args()
    pins = [f"{name}=={version}" for name, version in sorted(closure().items()) if name not in ON_THE_MACHINE]
    args.dest.mkdir(parents=True, exist_ok=True)
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", args.python, "--implementation", "cp", *platforms, "-d", str(args.dest)]
    status = subprocess.call([*command, *pins])
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl"))
    print(f"{len(pins)} packages, {size / 2**20:.1f} MiB in {args.dest}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
