"""Train the shipped ``toy-clip`` on the procedural toy world, reproducibly, on CPU.

Standard CLIP pre-training at toy scale: symmetric InfoNCE over image-caption pairs with CLIP's
learnable logit scale, AdamW with linear warm-up and cosine decay, every batch freshly rendered from
the seeded ``train`` stream (no pair is seen twice). At the end the weights are written as safetensors
and the saved file is reloaded through the ``toy-clip`` loader and measured on the evaluation splits:
template-averaged zero-shot top-1 and ECE on ``toy-id-test``, accuracy on the spurious common/counter
splits, and the mean max cosine similarity of ID vs near/far OOD images to the ID zero-shot head.

Usage::

    python scripts/train_toy.py                     # writes plugins/toyworld/weights/toy-clip.safetensors
    python scripts/train_toy.py --steps 100 --out /tmp/t.safetensors   # quick smoke run

The run is seeded (torch, numpy, data stream) and pinned to 2 threads; on 2 CPU cores it takes a few
minutes.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qbench.model import LoadRequest, VLM  # noqa: E402
from qbench_plugins.toyworld import plugin, world  # noqa: E402

MIN_ACCURACY = 0.80  # the bar for the shipped weights (also guarded by tests/test_toyworld.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128, help="image-caption pairs per step")
    parser.add_argument("--lr", type=float, default=7e-4, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and the training stream")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=1000, help="images per evaluation split")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--out", type=Path, default=plugin.WEIGHTS_PATH, help="safetensors file to write")
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Seed every RNG the run touches (the data stream is seeded separately, by ``--seed``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model() -> torch.nn.Module:
    """A randomly initialised ``qbench-toy-vit`` (open_clip's init; normal init for the image transformer)."""
    import open_clip

    plugin.register_model_config()
    model = open_clip.create_model(plugin.ARCH)
    init_visual_tower(model)
    return model


def init_visual_tower(model: torch.nn.Module) -> None:
    """Give the image transformer the normal initialisation open_clip uses for its text transformer.

    open_clip leaves the ViT's Linear/Conv weights at PyTorch's default (uniform) initialisation. A
    tiny model trained for a few thousand steps keeps that near-uniform weight distribution, which is
    unrealistically easy to quantize per channel. OpenAI CLIP's normal init (attention ``width^-1/2``,
    projections ``width^-1/2 (2 layers)^-1/2``, MLP in ``(2 width)^-1/2``; patch embedding
    ``fan_in^-1/2``) gives Gaussian weights like those of trained CLIPs, and it also trained faster here.
    """
    tower = model.visual.transformer
    attn_std = tower.width**-0.5
    proj_std = tower.width**-0.5 * (2 * tower.layers) ** -0.5
    fc_std = (2 * tower.width) ** -0.5
    with torch.no_grad():
        for block in tower.resblocks:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        patch = model.visual.conv1.weight
        torch.nn.init.normal_(patch, std=patch[0].numel() ** -0.5)


def pixel_normalizer(model: torch.nn.Module):
    """uint8 ``N x 32 x 32 x 3`` -> normalised float tensor, identical to the eval transform at 32 px.

    At the model's own resolution open_clip's resize and centre crop are identities, so training can
    skip PIL; ``check_preprocess_matches`` verifies this against the real transform.
    """
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    if cfg["size"] not in (world.IMAGE_SIZE, (world.IMAGE_SIZE, world.IMAGE_SIZE)):
        raise ValueError(f"model image size {cfg['size']} differs from the world's {world.IMAGE_SIZE}")
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def normalize(images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return (pixels - mean) / std

    return normalize


def check_preprocess_matches(model: torch.nn.Module, normalize) -> None:
    """Fail loudly if the training pixel path differs from the evaluation transform."""
    from PIL import Image

    images = world.generate("train", 4, seed=12345).images
    reference = torch.stack([plugin.toy_preprocess(model)(Image.fromarray(image)) for image in images])
    error = (reference - normalize(images)).abs().max().item()
    if error > 1e-5:
        raise RuntimeError(f"training preprocessing differs from the eval transform (max error {error:.2e})")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings of position and the logit scale."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exclude = parameter.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        exclude = exclude or "positional_embedding" in name or "class_embedding" in name
        (no_decay if exclude else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_loss(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch with the learnable (clamped at 100) logit scale."""
    image = model.encode_image(pixels, normalize=True)
    text = model.encode_text(tokens, normalize=True)
    logits = model.logit_scale.exp().clamp(max=100.0) * image @ text.T
    target = torch.arange(len(pixels))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def training_batches(seed: int, batch_size: int, steps: int) -> Iterator[world.ToySplit]:
    """Consecutive windows of the seeded ``train`` stream, rendered a few chunks at a time (no waste)."""
    block = max(batch_size, world.CHUNK * 4) // batch_size * batch_size
    for start in range(0, steps * batch_size, block):
        stop = min(start + block, steps * batch_size)
        rendered = world.stream_window("train", seed, start, stop)
        for offset in range(0, stop - start, batch_size):
            yield _slice(rendered, offset, offset + batch_size)


def _slice(split: world.ToySplit, start: int, stop: int) -> world.ToySplit:
    return world.ToySplit(
        split.split, split.seed, split.images[start:stop], split.labels[start:stop], split.captions[start:stop],
        split.classnames, split.backgrounds[start:stop], split.colours[start:stop], split.radii[start:stop],
    )


def train(args: argparse.Namespace) -> torch.nn.Module:
    """The training loop; returns the trained model."""
    import open_clip

    model = build_model()
    tokenizer = open_clip.get_tokenizer(plugin.ARCH)
    normalize = pixel_normalizer(model)
    check_preprocess_matches(model, normalize)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    parameters = sum(p.numel() for p in model.parameters())
    visual = sum(p.numel() for p in model.visual.parameters())
    print(f"qbench-toy-vit: {parameters / 1e6:.2f} M parameters ({visual / 1e6:.2f} M visual); "
          f"{args.steps} steps x {args.batch_size} pairs, lr {args.lr}, seed {args.seed}", flush=True)

    model.train()
    started = time.perf_counter()
    running = 0.0
    for step, batch in enumerate(training_batches(args.seed, args.batch_size, args.steps)):
        pixels = normalize(batch.images)
        tokens = tokenizer(list(batch.captions))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = clip_loss(model, pixels, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - started
            count = (step % args.log_every) + 1
            print(f"step {step + 1:5d}/{args.steps}  loss {running / count:.3f}  "
                  f"scale {model.logit_scale.exp().item():6.2f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{(step + 1) * args.batch_size / elapsed:5.0f} pairs/s  {elapsed:6.1f}s", flush=True)
            running = 0.0
    model.eval()
    return model


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Contiguous fp32 state dict as safetensors (open_clip loads it with ``pretrained=path``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, str(path))


# -- measurement ----------------------------------------------------------------------------------------
@torch.no_grad()
def image_features(vlm: VLM, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """Normalised image embeddings through the VLM's own preprocessing (PIL path, as evaluation does)."""
    from PIL import Image

    out = []
    for start in range(0, len(images), batch):
        pixels = torch.stack([vlm.preprocess(Image.fromarray(image)) for image in images[start:start + batch]])
        out.append(vlm.encode_image(pixels).float())
    return torch.cat(out)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


def evaluate(vlm: VLM, n: int, seed: int = 0) -> dict[str, float]:
    """Zero-shot numbers on the toy evaluation splits (the same splits qbench evaluates)."""
    head = vlm.zero_shot_head(world.ID_CLASSES, world.TEMPLATES)
    results: dict[str, float] = {}
    max_similarity: dict[str, float] = {}
    for split in ("id-test", "spurious-common", "spurious-counter", "ood-near", "ood-far"):
        data = world.generate(split, n, seed)
        similarity = image_features(vlm, data.images) @ head.T
        max_similarity[split] = similarity.max(dim=1).values.mean().item()
        if data.classnames == world.ID_CLASSES:
            labels = torch.from_numpy(data.labels)
            results[f"accuracy/{split}"] = (similarity.argmax(dim=1) == labels).float().mean().item()
            if split == "id-test":
                probs = (vlm.logit_scale * similarity).softmax(dim=1)
                results["ece/id-test"] = expected_calibration_error(probs, labels)
                results["mean_confidence/id-test"] = probs.max(dim=1).values.mean().item()
    for split, value in max_similarity.items():
        results[f"mean_max_cos/{split}"] = value
    results["logit_scale"] = vlm.logit_scale
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    started = time.perf_counter()
    model = train(args)
    train_seconds = time.perf_counter() - started
    save_weights(model, args.out)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.1f} MB, tag {plugin.weights_tag(args.out)}) after {train_seconds:.0f}s of training")

    vlm = plugin.load_toy_clip(LoadRequest(weights=str(args.out)))
    results = evaluate(vlm, args.eval_images)
    print(f"zero-shot top-1 on toy-id-test ({args.eval_images} images): {results['accuracy/id-test']:.4f}")
    print(f"ECE (15 bins) {results['ece/id-test']:.4f}, mean confidence {results['mean_confidence/id-test']:.4f}, "
          f"logit scale {results['logit_scale']:.2f}")
    print(f"spurious: common {results['accuracy/spurious-common']:.4f} vs counter "
          f"{results['accuracy/spurious-counter']:.4f}")
    print("mean max cosine to the ID head: " + ", ".join(
        f"{split} {results[f'mean_max_cos/{split}']:.4f}" for split in ("id-test", "ood-near", "ood-far")))
    print(f"total time {time.perf_counter() - started:.0f}s")
    if results["accuracy/id-test"] < MIN_ACCURACY:
        print(f"WARNING: zero-shot accuracy below the {MIN_ACCURACY:.0%} bar", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
