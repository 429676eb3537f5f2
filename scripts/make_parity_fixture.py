"""Golden fixture from the MaskInversion authors' own code, for ``tests/test_authors_parity.py``.

Installs the authors' released packages (``maskinversion-torch`` 1.1, ``legrad-torch`` 1.1 and
the ``open_clip_torch`` 2.23.0 they are written for, plus ``einops``) with ``pip install
--no-deps --target`` into an isolated, git-ignored folder (default ``.authors/``); torch, timm,
torchvision and numpy come from the running environment, which is never modified. It then runs
itself in a subprocess with ``PYTHONPATH`` pointing at that folder, where it

* builds a small RANDOM ViT with open_clip 2.23 (3 blocks, width 48, patch 32, 224 px native;
  random weights: this is a numerical parity fixture, never a quality claim),
* runs the authors' ``LeWrapper.compute_legrad`` (last one and last two blocks) at 224 and 448 px,
* runs the authors' ``MaskInversion.compute_maskinversion`` on five masks of different sizes and
  shapes (one soft) at the photo's own 240x320 resolution, ONE MASK PER CALL, for 224 and 448
  px, lr 0.1 and 0.5, alpha 0 and 5, recording the loss of every step, the final tokens and the
  maps they return; plus one call with all five masks together (their loss is a mean over the
  masks of a call, so that result depends on the mask count; kept for the record),
* does all of it twice: in float32, as the authors run, and in float64 (the model cast after
  their wrapper's own cast to float32), the reference a machine-independent test needs,

and writes everything (the model's image-tower weights, the photo, the masks, subsampled maps)
into one small ``.npz``. Usage::

    python scripts/make_parity_fixture.py            # install if needed, write the fixture
    python tests/test_authors_parity.py              # parity numbers against this project

The authors' ``legrad.utils`` imports OpenCV for its plotting helpers only; OpenCV is a large
binary wheel, so the subprocess registers an empty ``cv2`` module instead of installing it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TARGET = REPO / ".authors"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "authors_parity.npz"
AUTHORS_PACKAGES = [
    "maskinversion-torch==1.1.*",
    "legrad-torch==1.1.*",
    "open_clip_torch==2.23.0",
    "einops",
]

MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 224,
        "patch_size": 32,
        "width": 48,
        "layers": 3,
        "head_width": 12,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
PHOTO_HW = (240, 320)
RESOLUTIONS = (224, 448)
LRS = (0.1, 0.5)
ALPHAS = (0.0, 5.0)
STEPS = 10
LEGRAD_LAYERS = (1, 2)
LEGRAD_STRIDE = 8  # LeGrad maps are stored at every 8th pixel of the input size
MASK_STRIDE = 8  # MaskInversion maps at every 8th pixel of the masks' resolution
PIXEL_STRIDE = 7  # preprocessed input checked at every 7th pixel
#: float32 is how the authors run (their MaskInversion casts the model); float64 runs the same
#: code with float32 round-off out of the way, the reference a machine-independent test needs.
PRECISIONS = {"f32": "float32", "f64": "float64"}
SEED = 0


def install(target: Path) -> None:
    """``pip install --no-deps --target`` the authors' packages (nothing else is touched)."""
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target"]
    subprocess.run([*command, str(target), *AUTHORS_PACKAGES], check=True)


def installed(target: Path) -> bool:
    return all((target / name).is_dir() for name in ("maskinversion", "legrad", "open_clip"))


# ---------------------------------------------------------------------- inputs (numpy only)
def make_photo(seed: int = SEED):
    """A 240x320 RGB photo: smooth colour fields plus texture, deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize(PHOTO_HW[::-1], Image.Resampling.BICUBIC), dtype=float
    )
    noise = rng.normal(0, 25, size=smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def make_masks():
    """Five masks at the photo's resolution, uint8 0..255 as the authors read mask files:
    a large rectangle, a small ellipse, a thin diagonal stripe, an L shape, a soft blob."""
    import numpy as np

    height, width = PHOTO_HW
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    masks = np.zeros((5, height, width))
    masks[0, 40:200, 60:220] = 1
    masks[1] = ((yy - 60) / 18) ** 2 + ((xx - 260) / 26) ** 2 <= 1
    masks[2] = np.abs(yy - 0.6 * xx - 20) < 6
    masks[3, 150:230, 20:60] = 1
    masks[3, 200:230, 20:150] = 1
    masks[4] = np.exp(-((yy - 170) ** 2 + (xx - 230) ** 2) / (2 * 30.0**2))
    return np.round(masks * 255).astype(np.uint8)


# ---------------------------------------------------------------------- authors' side
def generate(out: Path) -> None:
    """Run the authors' code (this process has their packages first on ``sys.path``)."""
    import types

    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # plotting-only import, see above

    import numpy as np
    import open_clip
    import torch
    import torch.nn.functional as F
    from open_clip.version import __version__ as open_clip_version
    from PIL import Image

    if open_clip_version != "2.23.0" or not open_clip.__file__.startswith(os.environ["AUTHORS"]):
        raise SystemExit(f"expected open_clip 2.23.0 from the target dir, got {open_clip_version}")
    import maskinversion.maskinversion as mi_module
    from legrad import LePreprocess, LeWrapper
    from maskinversion import MaskInversion

    torch.manual_seed(SEED)
    template = open_clip.CLIP(**MODEL_CFG)
    with torch.no_grad():
        # Zero biases and unit LayerNorms would hide mistakes in how they enter; make them
        # random, and sharpen attention so gradients are well above float32 round-off.
        for param in template.visual.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
        for block in template.visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(3.0)
    state = {k: v.detach().clone() for k, v in template.state_dict().items()}

    def fresh_model() -> torch.nn.Module:
        """The authors' wrapper overwrites the positional embedding in place: new model each time."""
        model = open_clip.CLIP(**MODEL_CFG)
        model.load_state_dict(state)
        return model.eval()

    photo = make_photo()
    masks_u8 = make_masks()
    masks = torch.as_tensor(masks_u8 / 255.0, dtype=torch.float)  # MaskInversionMaskPreprocess
    base_transform = open_clip.image_transform(224, is_train=False)
    queries = F.normalize(torch.randn(3, MODEL_CFG["embed_dim"]), dim=-1)
    arrays: dict[str, np.ndarray] = {
        "photo": photo,
        "masks": masks_u8,
        "legrad_queries": queries.numpy(),
    }
    arrays.update({f"state.{k}": v.numpy() for k, v in state.items() if k.startswith("visual.")})

    records: dict[str, list] = {"dice": [], "lets": []}
    authors_dice = mi_module.batched_dice_loss

    def recording_dice(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = authors_dice(input=input, target=target)
        records["dice"].append(value.detach().clone())
        return value

    mi_module.batched_dice_loss = recording_dice  # records, returns the authors' value as is

    class RecordingAdamW(torch.optim.AdamW):
        """AdamW that keeps the token entering each step (to recompute the context term)."""

        def step(self, closure=None):  # type: ignore[override]
            records["lets"].append(self.param_groups[0]["params"][0].detach().clone())
            return super().step(closure)

    def as_stored(values: torch.Tensor) -> np.ndarray:
        """float32 storage: ample for a 1e-5 comparison, half the fixture's size."""
        return values.detach().float().numpy()

    def one_call(inverter, pixels, target, lr, alpha):
        records["dice"].clear()
        records["lets"].clear()
        emb, expl = inverter.compute_maskinversion(
            pixels, target, alpha=alpha, lr=lr, iterations=STEPS, return_expl_map=True
        )
        image_direction = F.normalize(records["lets"][0], dim=-1)  # the init is the image's
        losses = [
            (
                dice + alpha * (1 - (image_direction * F.normalize(let, dim=-1)).sum(dim=-1)).mean()
            ).item()
            for dice, let in zip(records["dice"], records["lets"], strict=True)
        ]
        return emb.detach(), expl.detach()[0], losses

    for precision, dtype_name in PRECISIONS.items():
        dtype = getattr(torch, dtype_name)
        for size in RESOLUTIONS:
            preprocess = LePreprocess(base_transform, size)
            pixels = preprocess(Image.fromarray(photo))[None]
            if precision == "f32":
                arrays[f"pixels_{size}"] = pixels[0, :, ::PIXEL_STRIDE, ::PIXEL_STRIDE].numpy()
            pixels = pixels.to(dtype)

            for layers in LEGRAD_LAYERS:
                wrapper = LeWrapper(fresh_model().to(dtype), layer_index=-layers)
                maps = wrapper.compute_legrad(text_embedding=queries.to(dtype), image=pixels)[0]
                arrays[f"{precision}_legrad_{size}_L{layers}"] = as_stored(
                    maps[:, ::LEGRAD_STRIDE, ::LEGRAD_STRIDE]
                )

            # MaskInversion.__init__ casts the model to float32 (the wrapper copies the model's
            # attributes, ``to`` included, so the float64 reference casts the model after it).
            model = fresh_model()
            inverter = MaskInversion(model, optimizer=RecordingAdamW)
            model.to(dtype)
            target = masks.to(dtype)
            for lr in LRS:
                for alpha in ALPHAS:
                    key = f"{precision}_mi_{size}_lr{lr}_alpha{alpha:g}"
                    embeddings, maps, losses = [], [], []
                    for m in range(len(masks)):
                        emb, expl, loss = one_call(inverter, pixels, target[m : m + 1], lr, alpha)
                        embeddings.append(as_stored(emb[0]))
                        maps.append(as_stored(expl[0, ::MASK_STRIDE, ::MASK_STRIDE]))
                        losses.append(loss)
                    arrays[f"{key}_embeddings"] = np.stack(embeddings)
                    arrays[f"{key}_maps"] = np.stack(maps)
                    arrays[f"{key}_losses"] = np.asarray(losses, dtype=np.float32)
            together = one_call(inverter, pixels, target, 0.5, 0.0)[0]
            key = f"{precision}_mi_{size}_lr0.5_alpha0_all_masks_one_call_embeddings"
            arrays[key] = as_stored(together)

    import legrad
    import maskinversion
    import timm

    meta = {
        "model_cfg": MODEL_CFG,
        "steps": STEPS,
        "resolutions": RESOLUTIONS,
        "lrs": LRS,
        "alphas": ALPHAS,
        "legrad_layers": LEGRAD_LAYERS,
        "legrad_stride": LEGRAD_STRIDE,
        "mask_stride": MASK_STRIDE,
        "pixel_stride": PIXEL_STRIDE,
        "precisions": list(PRECISIONS),
        "versions": {
            "open_clip": open_clip_version,
            "maskinversion": Path(maskinversion.__file__).parent.name + "-torch 1.1",
            "legrad": Path(legrad.__file__).parent.name + "-torch 1.1",
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
    }
    arrays["meta"] = np.asarray(json.dumps(meta))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(arrays)} arrays)")


# ---------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--reinstall", action="store_true", help="install even if present")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.out.resolve())
        return
    target = args.target.resolve()
    if args.reinstall or not installed(target):
        install(target)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "AUTHORS": str(target),
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--generate", "--out"]
    # Run from the target dir so the checkout's own packages are not importable by accident.
    subprocess.run([*command, str(args.out.resolve())], check=True, env=env, cwd=target)


if __name__ == "__main__":
    main()
