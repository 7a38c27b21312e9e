"""Deterministic stand-in weights for a recipe, in the mmdet3d release layout.

No real checkpoint can ship with the repository, yet ``make demo`` and the
tests need one that behaves like trained weights: random convolutions with
batch-norm statistics measured on synthetic inputs, LiDAR sweeps or camera
frames (so activations have realistic ranges and BN folding is exercised with
non-trivial values), and the architecture's own initial structure (CenterHead's heatmap bias of -2.19,
BEVFormer's deformable-attention offset rings). The file is written as
mmcv does (``{"meta": ..., "state_dict": ...}``) so the real loading path runs.

    python -m deploykit.synthetic_checkpoint --recipe centerpoint_pillar_small --out ckpt.pth

``--init xavier`` writes instead what a model holds before training, initialised as DETR-style
transformers are (``xavier_uniform_`` on every matrix, as BEVFormer's
``PerceptionTransformer.init_weights`` does for its own): deep untrained decoders amplify float32
noise far more than trained or default-initialised ones, which makes it the hard case for
numeric checks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from .artifacts import atomic_file
from .recipe import REPO_ROOT, Recipe, load_recipe

CACHE_DIR = REPO_ROOT / ".cache" / "checkpoints"
CALIBRATION_SAMPLES = 2


def synthetic_state_dict(recipe: Recipe, seed: int) -> dict[str, torch.Tensor]:
    from .models import ARCHITECTURES, build_model, make_sample

    torch.manual_seed(seed)
    model = build_model(recipe)
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data = 0.5 + torch.rand(module.num_features, generator=gen)
            module.bias.data = 0.1 * torch.randn(module.num_features, generator=gen)
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration samples
    ARCHITECTURES[recipe.arch].synthetic_init(model, recipe.model, gen)
    model.train()
    with torch.no_grad():
        for i in range(CALIBRATION_SAMPLES):
            sample = make_sample(recipe, seed=10_000 + seed * 100 + i, model=model)
            model(*(torch.from_numpy(sample.reference[n]) for n in model.input_names))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def xavier_state_dict(recipe: Recipe, seed: int) -> dict[str, torch.Tensor]:
    from .models import build_model

    torch.manual_seed(seed)
    model = build_model(recipe)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    return model.state_dict()


INITS = {"synthetic": synthetic_state_dict, "xavier": xavier_state_dict}


def write_synthetic_checkpoint(recipe: Recipe, seed: int, path: Path, init: str = "synthetic") -> Path:
    from .models import ARCHITECTURES

    state = INITS[init](recipe, seed)
    meta = {"recipe": recipe.name, "seed": seed, "synthetic": True, "init": init}
    layout = ARCHITECTURES[recipe.arch].release_layout
    payload = layout(state, meta) if layout else {"meta": meta, "state_dict": state}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def default_checkpoint(recipe: Recipe) -> Path:
    """The recipe's bundled checkpoint, generated into .cache/ on first use."""
    spec = recipe.checkpoint
    if spec.default != "synthetic":
        return REPO_ROOT / spec.default
    path = CACHE_DIR / f"{recipe.name}-synthetic-seed{spec.seed}.pth"
    if not path.exists():
        write_synthetic_checkpoint(recipe, spec.seed, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--init", choices=sorted(INITS), default="synthetic",
                        help="synthetic: BN calibrated on synthetic inputs (the bundled default); "
                             "xavier: untrained, DETR-style")
    args = parser.parse_args()
    print(write_synthetic_checkpoint(load_recipe(args.recipe), args.seed, args.out, args.init))


if __name__ == "__main__":
    main()
