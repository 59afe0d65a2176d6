"""Full fine-tuning of the pretrained MiniLM (all-MiniLM-L6-v2) for sentiment with
lrk.optim.GaLoreAdamW, handed to the Hugging Face Trainer through its
`optimizers=` argument, next to the same run with plain AdamW. GaLore keeps the
Adam moments of every weight matrix in a rank-r subspace, so its optimizer state
is a fraction of AdamW's; the script prints both, measured from the optimizers.

    python examples/galore_trainer.py                 # 60 steps (CPU: about a minute)
    python examples/galore_trainer.py --max-steps 3   # smoke test
"""
import tempfile

import _common
import torch
from transformers import Trainer

from lrk.optim import GaLoreAdamW

RANK = 32


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, projectors, ...)."""
    inner = getattr(optimizer, "optimizer", optimizer)   # Trainer wraps it for accelerate
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def galore_optimizer(model, lr: float) -> GaLoreAdamW:
    # Weight matrices of the encoder get the projected update; embeddings, norms,
    # biases and the new classification head plain AdamW.
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and "encoder" in n and min(p.shape) > RANK]
    rest = [p for p in model.parameters() if all(p is not q for q in mats)]
    return GaLoreAdamW([{"params": rest},
                        {"params": mats, "rank": RANK, "update_proj_gap": 50, "scale": 0.25, "proj_type": "svd"}],
                       lr=lr, weight_decay=0.0)


def run(args, train_set, output_dir: str, use_galore: bool):
    _, model = _common.load_classifier(args.device, seed=args.seed)
    lr = 1e-4
    optimizers = (galore_optimizer(model, lr), None) if use_galore else (None, None)
    trainer = Trainer(model=model, args=_common.trainer_arguments(output_dir, args, learning_rate=lr,
                                                                  optim="adamw_torch", weight_decay=0.0),
                      train_dataset=train_set, optimizers=optimizers)
    trainer.train()
    return _common.step_losses(trainer), state_bytes(trainer.optimizer)


def main():
    args = _common.parse_args(__doc__, default_steps=60)
    tokenizer, _ = _common.load_classifier(args.device)
    texts, labels = _common.sentiment_texts(512, seed=args.seed)
    train_set = _common.TokenizedDataset(tokenizer, texts, labels)
    with tempfile.TemporaryDirectory() as tmp:
        adam_losses, adam_state = run(args, train_set, f"{tmp}/adamw", use_galore=False)
        galore_losses, galore_state = run(args, train_set, f"{tmp}/galore", use_galore=True)
    print(f"\ndevice {args.device}, {args.max_steps} steps, GaLore rank {RANK}")
    print(f"{'step':>5} {'AdamW loss':>11} {'GaLoreAdamW loss':>17}")
    for step, (a, b) in enumerate(zip(adam_losses, galore_losses), 1):
        print(f"{step:>5} {a:>11.4f} {b:>17.4f}")
    print(f"optimizer state: AdamW {adam_state / 2**20:.1f} MiB, GaLoreAdamW {galore_state / 2**20:.1f} MiB "
          f"({galore_state / adam_state:.0%} of AdamW's)")
    if len(galore_losses) != args.max_steps or not all(map(lambda v: v == v, galore_losses)):
        raise SystemExit("expected a finite logged loss per step")
    if not galore_state < adam_state:
        raise SystemExit("GaLoreAdamW's state should be smaller than AdamW's")


if __name__ == "__main__":
    main()
