"""Train the small embedded UperNet on procedural shapes/textures (`upernet_fast.synthetic`).

    python tools/train_embedded.py [--minutes 15] [--out upernet_fast/assets/embedded]

One CPU thread (the machine is shared), fresh samples every step (stream seed 1; the tests use other seeds),
AdamW with warm-up and a cosine schedule over a wall-clock budget, so the run always fits the time given.
The weights are written with transformers' `save_pretrained` (the hub format `upernet_fast.load` reads), plus
`preprocessor_config.json` (the training input size) so `Segmenter.from_pretrained` preprocesses the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from upernet_fast import preprocess, synthetic

TRAIN_SEED = 1  # the held-out test stream uses a different seed (see tests/test_embedded_model.py)
VAL_SEED = 2


def build_model(num_labels: int):
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 3, 1],
        out_features=["stage1", "stage2", "stage3", "stage4"],
        layer_scale_init_value=1.0,  # the hub default 1e-6 makes a short training run crawl
    )
    id2label = dict(enumerate(synthetic.CLASSES))
    config = UperNetConfig(
        backbone_config=backbone,
        hidden_size=48,
        pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True,
        auxiliary_in_channels=64,
        auxiliary_channels=16,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    return UperNetForSemanticSegmentation(config)


def batch(seed: int, start: int, n: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(synthetic.sample(seed, start + i, size) for i in range(n)))
    pixel_values = torch.stack([preprocess.normalize(img) for img in images])
    return pixel_values, torch.from_numpy(np.stack(labels)).long()


@torch.no_grad()
def evaluate(model, n: int, size: tuple[int, int]) -> float:
    model.eval()
    preds, targets = [], []
    for start in range(0, n, 16):
        pv, lab = batch(VAL_SEED, start, min(16, n - start), size)
        preds.append(model(pixel_values=pv).logits.argmax(1).numpy())
        targets.append(lab.numpy())
    model.train()
    return synthetic.mean_iou(np.concatenate(preds), np.concatenate(targets))[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget")
    parser.add_argument("--size", type=int, default=128, help="square training resolution")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "upernet_fast/assets/embedded")
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    size = (args.size, args.size)
    model = build_model(len(synthetic.CLASSES))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    budget, warmup = args.minutes * 60.0, 0.03
    start, step = time.time(), 0
    while (progress := (time.time() - start) / budget) < 1.0:
        scale = min(1.0, progress / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = args.lr * max(scale, 0.01)
        pv, lab = batch(TRAIN_SEED, step * args.batch_size, args.batch_size, size)
        loss = model(pixel_values=pv, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(
                f"step {step}  {time.time() - start:6.0f}s  lr {opt.param_groups[0]['lr']:.2e}  loss {loss.item():.4f}",
                flush=True,
            )
    miou = evaluate(model, 128, size)
    print(f"trained {step} steps in {time.time() - start:.0f}s; validation mIoU {miou:.4f}")

    out = Path(args.out)
    model.eval()
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocess.processor_config(size), indent=2) + "\n"
    )
    info = {
        "steps": step,
        "batch_size": args.batch_size,
        "input_size": list(size),
        "train_seed": TRAIN_SEED,
        "val_seed": VAL_SEED,
        "val_miou": round(miou, 4),
        "minutes": args.minutes,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
