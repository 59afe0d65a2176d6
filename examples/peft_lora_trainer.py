"""Fine-tune the pretrained MiniLM (all-MiniLM-L6-v2) for sentiment with PEFT LoRA
through the Hugging Face Trainer, twice from the same start: with PEFT's own LoRA
layers, and with the same layers routed through lrk's fused kernels
(lrk.integrations.peft.accelerate). Prints both loss curves side by side.

    python examples/peft_lora_trainer.py                 # 60 steps (CPU: about a minute)
    python examples/peft_lora_trainer.py --max-steps 3   # smoke test

With dropout 0 the two runs compute the same function, so their losses agree to
float rounding; the adapter saved by either is an ordinary PEFT adapter.
"""
import tempfile
import time

import _common
from peft import LoraConfig, TaskType, get_peft_model
from transformers import Trainer

import lrk
from lrk.integrations.peft import accelerate


def train(args, train_set, use_lrk: bool, output_dir: str):
    _, model = _common.load_classifier(args.device, seed=args.seed)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["query", "key", "value", "dense"])
    model = get_peft_model(model, config)
    if use_lrk:
        layers = accelerate(model)
        print(f"[lrk] {len(layers)} PEFT LoRA layers run on lrk's fused ops")
    trainer = Trainer(model=model, args=_common.trainer_arguments(output_dir, args), train_dataset=train_set)
    t0 = time.perf_counter()
    trainer.train()
    return _common.step_losses(trainer), time.perf_counter() - t0, model


def main():
    args = _common.parse_args(__doc__, default_steps=60)
    tokenizer, _ = _common.load_classifier(args.device)
    texts, labels = _common.sentiment_texts(512, seed=args.seed)
    train_set = _common.TokenizedDataset(tokenizer, texts, labels)
    with tempfile.TemporaryDirectory() as tmp:
        peft_losses, peft_s, _ = train(args, train_set, use_lrk=False, output_dir=f"{tmp}/peft")
        lrk_losses, lrk_s, model = train(args, train_set, use_lrk=True, output_dir=f"{tmp}/lrk")
        model.save_pretrained(f"{tmp}/adapter")   # a plain PEFT adapter (lrk changes no parameter)
    print(f"\nlrk {lrk.__version__}, device {args.device}, {args.max_steps} steps")
    print(f"{'step':>5} {'PEFT loss':>10} {'PEFT+lrk loss':>14} {'difference':>11}")
    for step, (a, b) in enumerate(zip(peft_losses, lrk_losses), 1):
        print(f"{step:>5} {a:>10.4f} {b:>14.4f} {b - a:>11.2e}")
    print(f"train time: PEFT {peft_s:.1f} s, PEFT+lrk {lrk_s:.1f} s")
    if len(peft_losses) != args.max_steps or len(lrk_losses) != args.max_steps:
        raise SystemExit("expected one logged loss per step")
    worst = max(abs(a - b) for a, b in zip(peft_losses, lrk_losses))
    # Same start, same batches, same function: only float rounding may differ.
    tolerance = 2e-3 if args.device.type == "cpu" else 2e-2
    if not worst <= tolerance:
        raise SystemExit(f"PEFT and PEFT+lrk losses differ by {worst:.3e} (> {tolerance})")
    print(f"largest loss difference {worst:.2e} (<= {tolerance})")


if __name__ == "__main__":
    main()
