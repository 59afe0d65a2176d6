"""Runs every example of this folder in one process (the Hugging Face and torch
imports, most of a short run's time, are paid once) and reports each one:

    python examples/run_all.py --max-steps 3     # what tests/test_examples.py runs
    python examples/run_all.py                   # each example's full length

Extra arguments (--max-steps, --device) go to every example. Exits nonzero when
any example fails its own checks.
"""
import os
import runpy
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = ["peft_lora_trainer.py", "galore_trainer.py", "sara_finetune.py", "multi_lora_serving.py"]


def run(script: str, argv: list[str]) -> tuple[bool, str]:
    sys.argv = [os.path.join(HERE, script), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            return False, str(exc.code)
    except Exception:
        return False, traceback.format_exc()
    return True, ""


def main() -> int:
    argv = sys.argv[1:]
    failed = []
    for script in EXAMPLES:
        print(f"=== {script} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        ok, why = run(script, argv)
        status = "ok" if ok else "FAILED"
        print(f"=== {script}: {status} in {time.perf_counter() - t0:.1f} s{': ' + why if why else ''}", flush=True)
        if not ok:
            failed.append(script)
    print(f"=== {len(EXAMPLES) - len(failed)} of {len(EXAMPLES)} examples ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
