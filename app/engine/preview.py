"""A cheap picture of a denoising step: the latents through a fixed linear map to RGB, no VAE decode.

SD 1.5's four latent channels are close to a linear function of the image's colours; the factors are
the well-known least-squares fit used by ComfyUI's and AUTOMATIC1111's "latent2rgb" previews. One
64x64 latent (a 512² image) costs a 4x3 matrix product: microseconds beside a UNet step.
"""

from __future__ import annotations

import numpy as np
import torch

# rows: latent channels 0..3; columns: R, G, B
LATENT_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)
PREVIEW_MAX_SIDE = 128


def latent_preview(latents: torch.Tensor, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """One image's latents (4, h, w) as an RGB uint8 array (h', w', 3), at most `max_side` a side.

    Latents are an eighth of the image's size, so up to a 1024² image this is the latents' own size;
    larger ones are subsampled by a whole stride.
    """
    stride = max(1, -(-max(latents.shape[-2:]) // max_side))
    small = latents[:, ::stride, ::stride].float().cpu()
    rgb = torch.einsum("chw,cr->hwr", small, LATENT_RGB_FACTORS)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
