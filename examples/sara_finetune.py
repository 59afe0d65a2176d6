"""SaRA fine-tuning of the pretrained MiniLM (all-MiniLM-L6-v2) for sentiment: the 1%
smallest-magnitude weights of every attention and feed-forward matrix are trained in
place (lrk.nn.apply_sara; optimizer state for those entries only), through the
Hugging Face Trainer. The result is saved two ways and reloaded, and the reloaded
model's outputs are checked equal to the trained model's:

  1. merged: plain nn.Linear layers again (lrk.nn.merge_sara), an ordinary
     `save_pretrained` checkpoint that loads without lrk;
  2. sparse: only the changed weights (SaRALinear.delta_sparse()) plus the new
     classification head, applied to a freshly loaded pretrained model
     (lrk.nn.sara.apply_delta): a small file.

    python examples/sara_finetune.py                 # 60 steps (CPU: about a minute)
    python examples/sara_finetune.py --max-steps 3   # smoke test
"""
import os
import tempfile

import _common
import torch
from transformers import AutoModelForSequenceClassification, Trainer

from lrk.nn import apply_sara, attach_sara, merge_sara
from lrk.nn.sara import apply_delta

TARGETS = ["query", "key", "value", "dense"]   # every Linear of the encoder (name suffixes)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def main():
    args = _common.parse_args(__doc__, default_steps=60)
    tokenizer, model = _common.load_classifier(args.device, seed=args.seed)
    texts, labels = _common.sentiment_texts(512, seed=args.seed)
    train_set = _common.TokenizedDataset(tokenizer, texts, labels)
    eval_texts, _ = _common.sentiment_texts(32, seed=args.seed + 1)
    batch = {k: v.to(args.device) for k, v in tokenizer(eval_texts, padding=True, return_tensors="pt").items()}

    layers = apply_sara(model, TARGETS, fraction=0.01)
    head = list(model.classifier.parameters())
    for p in head:
        p.requires_grad_(True)   # the new head is trained densely
    trained = sum(layer.nnz for layer in layers)
    total = sum(layer.in_features * layer.out_features for layer in layers)
    print(f"SaRA: {len(layers)} layers, {trained} of {total} weights trained ({trained / total:.2%})")
    optimizer = torch.optim.AdamW([{"params": [layer.delta for layer in layers]}, {"params": head}],
                                  lr=1e-3, weight_decay=0.0)
    attach_sara(optimizer, model)   # writes the trained entries into W after each step
    trainer = Trainer(model=model, args=_common.trainer_arguments(os.path.join(tempfile.gettempdir(), "lrk-sara"),
                                                                  args),
                      train_dataset=train_set, optimizers=(optimizer, None))
    trainer.train()
    losses = _common.step_losses(trainer)
    print("loss per step:", " ".join(f"{v:.4f}" for v in losses))
    if len(losses) != args.max_steps:
        raise SystemExit("expected one logged loss per step")

    trained_logits = logits(model, batch)
    deltas = {name: module.delta_sparse() for name, module in model.named_modules() if module in layers}
    head_state = {k: v.detach().clone() for k, v in model.classifier.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        # 1. merged checkpoint
        merge_sara(model)
        model.save_pretrained(f"{tmp}/merged")
        reloaded = AutoModelForSequenceClassification.from_pretrained(f"{tmp}/merged").to(args.device)
        merged_diff = (logits(reloaded, batch) - trained_logits).abs().max().item()
        # 2. sparse deltas only
        torch.save({"deltas": deltas, "classifier": head_state}, f"{tmp}/sara_delta.pt")
        saved = torch.load(f"{tmp}/sara_delta.pt", weights_only=True)
        _, fresh = _common.load_classifier(args.device, seed=args.seed + 123)   # another random head
        for name, delta in saved["deltas"].items():
            apply_delta(fresh.get_submodule(name), delta.to(args.device))
        fresh.classifier.load_state_dict(saved["classifier"])
        sparse_diff = (logits(fresh, batch) - trained_logits).abs().max().item()
        sizes = {kind: os.path.getsize(path) for kind, path in
                 (("merged", f"{tmp}/merged/model.safetensors"), ("sparse", f"{tmp}/sara_delta.pt"))}
    print(f"saved: merged checkpoint {sizes['merged'] / 2**20:.1f} MiB, sparse delta {sizes['sparse'] / 2**20:.2f} MiB")
    print(f"reloaded vs trained, largest logit difference: merged {merged_diff:.2e}, sparse delta {sparse_diff:.2e}")
    # The same weights in the same nn.Linear layers: the same numbers (the SaRA layer's
    # forward is the dense product with the same W).
    tolerance = 1e-5 if args.device.type == "cpu" else 1e-3
    if not (merged_diff <= tolerance and sparse_diff <= tolerance):
        raise SystemExit(f"reloaded outputs differ from the trained model's (> {tolerance})")


if __name__ == "__main__":
    main()
