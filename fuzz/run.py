"""Coverage-guided fuzzing of the parsers with atheris (libFuzzer).

    python fuzz/run.py -atheris_runs=100000            # or any libFuzzer flag
    python fuzz/run.py fuzz/corpus -max_total_time=600  # keep a corpus between runs

A crash prints the input and exits non-zero; see fuzz/targets.py for the contract checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["mptun", "fuzz"]):
    from fuzz.targets import one_input


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
