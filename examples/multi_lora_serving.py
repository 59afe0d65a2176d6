"""Serving several LoRA adapters at once on the pretrained MiniLM (all-MiniLM-L6-v2)
with lrk.nn.MultiLoRALinear: one base model, three PEFT adapters of different
ranks loaded into slots (lrk.nn.apply_multi_lora), and one mixed batch in which
every request names its adapter (or none). Each request's output is checked
against PEFT running that request's adapter alone.

    python examples/multi_lora_serving.py                 # 20 batches
    python examples/multi_lora_serving.py --max-steps 3   # smoke test

The adapters are made here (random PEFT LoRA weights, saved with PEFT's
save_pretrained) so that the example needs no download; trained adapters load
the same way.
"""
import tempfile
import time

import _common
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoTokenizer

from lrk.nn import apply_multi_lora

ADAPTERS = {"support": 4, "legal": 8, "medical": 16}   # name -> rank
TARGETS = ["query", "value"]


def base_model(device):
    return AutoModel.from_pretrained(_common.minilm_dir()).to(device).eval()


def make_adapters(directory: str, device) -> dict:
    """PEFT LoRA adapters with random (nonzero) weights, saved as PEFT saves them."""
    paths = {}
    for i, (name, rank) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        peft_model = get_peft_model(base_model(device), config)
        paths[name] = f"{directory}/{name}"
        peft_model.save_pretrained(paths[name])
    return paths


def main():
    args = _common.parse_args(__doc__, default_steps=20)
    tokenizer = AutoTokenizer.from_pretrained(_common.minilm_dir())
    texts, _ = _common.sentiment_texts(8, seed=args.seed)
    requests = ["support", None, "legal", "medical", "support", None, "medical", "legal"]   # per sequence
    batch = {k: v.to(args.device) for k, v in tokenizer(texts, padding=True, return_tensors="pt").items()}

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(tmp, args.device)

        # Reference: PEFT with one adapter at a time, on the whole batch.
        expected = {}
        with torch.inference_mode():
            expected[None] = base_model(args.device)(**batch).last_hidden_state
            for name, path in paths.items():
                peft_model = PeftModel.from_pretrained(base_model(args.device), path).eval()
                expected[name] = peft_model(**batch).last_hidden_state

        # Serving: one model, every adapter in a slot, adapters chosen per request.
        model = base_model(args.device)
        manager = apply_multi_lora(model, TARGETS, max_adapters=4, r_max=max(ADAPTERS.values()))
        for name, path in paths.items():
            slot = manager.load_peft_adapter(name, path)
            print(f"adapter {name!r} (rank {ADAPTERS[name]}) in slot {slot}")

    manager.set_batch(requests, per_sequence=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(args.max_steps):
            out = model(**batch).last_hidden_state
        per_batch_ms = (time.perf_counter() - t0) / args.max_steps * 1e3

    worst = 0.0
    print(f"\n{'request':>7} {'adapter':>8} {'max |lrk - PEFT|':>17}")
    for i, name in enumerate(requests):
        diff = (out[i] - expected[name][i]).abs().max().item()
        worst = max(worst, diff)
        print(f"{i:>7} {str(name):>8} {diff:>17.2e}")
    changed = min((expected[n][i] - expected[None][i]).abs().max().item() for i, n in enumerate(requests) if n)
    print(f"mixed batch of {len(requests)} requests, {len(ADAPTERS)} adapters: {per_batch_ms:.1f} ms per batch "
          f"on {args.device}; smallest adapter effect {changed:.2e}, largest mismatch {worst:.2e}")
    tolerance = 1e-4 if args.device.type == "cpu" else 2e-2
    if not worst <= tolerance:
        raise SystemExit(f"multi-adapter outputs differ from PEFT's by {worst:.2e} (> {tolerance})")
    if not changed > 100 * max(worst, 1e-7):
        raise SystemExit("the adapters barely change the outputs: the check would not catch a wrong adapter")


if __name__ == "__main__":
    main()
