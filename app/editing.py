"""Image edits (img2img, inpainting): input images decoded and checked once at the edge, and the pixel
work around the denoising loop (mask blur, the crop of "inpaint only the masked area", pasting the
original back outside the mask, as AUTOMATIC1111 does). Torch-free: PIL only.

The edit crosses the request path as `EditSpec` (app/jobs.py): base64 PNGs, not images, so it pickles to
a Ray replica and goes into a job store (JSON) like the rest of the spec.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFilter, ImageOps

from app.errors import InvalidRequest
from app.jobs import EditSpec

# The most pixels an input image may declare before it is decoded: the largest width x height a request
# may ask for (4096 x 4096). MAX_PIXELS (the configured output limit) is checked on top by the service.
MAX_DECODE_PIXELS = 4096 * 4096
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_base64_image(text: str, field: str) -> Image.Image:
    """A base64 PNG/JPEG/WebP (a `data:image/...;base64,` prefix is accepted), decoded and checked."""
    payload = DATA_URL.sub("", text.strip(), count=1)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, f"{field} is not valid base64 (a base64 PNG or JPEG is expected)") from None
    return decode_image(raw, field)


def decode_image(raw: bytes, field: str) -> Image.Image:
    """Image bytes, decoded with PIL's limits: not an image, another format, too many pixels or a
    decompression bomb is an InvalidRequest naming `field`. The size is checked from the header,
    before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.format not in ACCEPTED_FORMATS:
                raise InvalidRequest(field, f"{field} is a {image.format} image; PNG, JPEG or WebP are accepted")
            check_pixels(image.size, MAX_DECODE_PIXELS, field)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(field, f"{field} is refused as a decompression bomb: {exc}") from None
    except InvalidRequest:
        raise
    except Exception as exc:  # PIL raises many types for broken data (UnidentifiedImageError, OSError, ...)
        raise InvalidRequest(field, f"{field} is not a readable image (PNG, JPEG or WebP): {exc}") from None
    return image


def check_pixels(size: tuple[int, int], max_pixels: int, field: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InvalidRequest(
            field, f"{field} has {width}x{height} = {width * height} pixels, above the maximum of {max_pixels}"
        )


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode("ascii")


def _open(data: str) -> Image.Image:
    """An EditSpec image (base64 PNG, made by `build_edit`)."""
    return Image.open(io.BytesIO(base64.b64decode(data)))


def build_edit(
    *,
    init_image: Image.Image,
    mask_image: Image.Image | None,
    width: int,
    height: int,
    strength: float,
    mask_blur: int,
    mask_invert: bool = False,
    inpaint_only_masked: bool = False,
    inpaint_padding: int = 32,
    masked_content: str = "original",
) -> EditSpec:
    """The edit of a request: the init image resized to width x height (RGB; in only-masked inpainting it
    keeps its own size), the mask (white = repaint) checked against the image's size, then resized alike."""
    if mask_image is not None and mask_image.size != init_image.size:
        raise InvalidRequest(
            "mask_image",
            f"mask_image is {mask_image.size[0]}x{mask_image.size[1]} but init_image is "
            f"{init_image.size[0]}x{init_image.size[1]}; they must be the same size",
        )
    source_size = init_image.size
    # Only-masked inpainting keeps the image's own size, as A1111's "inpaint only masked" does: the mask's
    # box is what is painted at width x height, then pasted back into the image.
    only_masked = inpaint_only_masked and mask_image is not None
    out_width, out_height = source_size if only_masked else (width, height)
    image = resize(init_image.convert("RGB"), out_width, out_height)
    mask = None
    if mask_image is not None:
        mask = mask_image.convert("L")
        if mask_invert:
            mask = ImageOps.invert(mask)
        if mask.getextrema()[1] == 0:
            raise InvalidRequest("mask_image", "mask_image is black everywhere: nothing to repaint (white = repaint)")
        mask = resize(mask, out_width, out_height)
    return EditSpec(
        image=png_base64(image),
        strength=strength,
        mask=png_base64(mask) if mask is not None else None,
        mask_blur=mask_blur,
        only_masked_padding=inpaint_padding if (inpaint_only_masked and mask is not None) else None,
        source_size=source_size,
        fill=masked_content == "fill" and mask is not None,
    )


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's "Just resize" (stretch to the size, Lanczos); the same image when the size already fits."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def mask_from_alpha(image: Image.Image) -> Image.Image | None:
    """OpenAI's mask convention as ours: fully transparent pixels are edited (white), the rest kept
    (black). None when the image has no fully transparent pixel."""
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    return mask if mask.getextrema()[1] == 255 else None


# ---- around the denoising loop (the engine calls these) ------------------------------------------------


@dataclass
class PreparedEdit:
    """What the pipeline is called with for one edit, and how its output becomes the answer."""

    image: Image.Image  # width x height RGB: the pipeline's init image (the crop, in only-masked mode)
    mask: Image.Image | None  # width x height L, blurred: the pipeline's mask (inpainting only)
    original: Image.Image  # the init image at width x height
    overlay_mask: Image.Image | None  # the blurred mask at width x height: where the result shows
    crop: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) in only-masked mode

    def finish(self, generated: Image.Image) -> Image.Image:
        """Inpainting: the generated pixels where the blurred mask is white, the original elsewhere
        (blended along the blur), so outside the mask the output is the init image pixel for pixel."""
        if self.overlay_mask is None:
            return generated
        generated = generated.convert("RGB")
        if self.crop is not None:
            x1, y1, x2, y2 = self.crop
            base = self.original.copy()
            base.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            generated = base
        return Image.composite(generated, self.original, self.overlay_mask)


def prepare_edit(edit: EditSpec, width: int, height: int) -> PreparedEdit:
    original = _open(edit.image).convert("RGB")
    if edit.mask is None:
        return PreparedEdit(original, None, original, None, None)
    mask = _open(edit.mask).convert("L")
    if edit.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(edit.mask_blur))
    if edit.only_masked_padding is None:
        image = fill(original, mask) if edit.fill else original
        return PreparedEdit(image, mask, original, mask, None)
    crop = expand_to_ratio(padded_box(mask, edit.only_masked_padding), width, height, *mask.size)
    image = original.crop(crop).resize((width, height), Image.Resampling.LANCZOS)
    crop_mask = mask.crop(crop).resize((width, height), Image.Resampling.LANCZOS)
    return PreparedEdit(fill(image, crop_mask) if edit.fill else image, crop_mask, original, mask, crop)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "masked content: fill": the masked area takes the blurred colours of its surroundings."""
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def padded_box(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """The box of the mask's non-black pixels plus `padding` on each side, inside the image."""
    x1, y1, x2, y2 = mask.getbbox() or (0, 0, *mask.size)
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_ratio(box, width: int, height: int, image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """A1111's `expand_crop_region`: grow the box to the width:height ratio, kept inside the image."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        x1, x2, y1, y2 = x1, x2, *_grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_height)
    else:
        y1, y2, x1, x2 = y1, y2, *_grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(start: int, end: int, by: int, limit: int) -> tuple[int, int]:
    start, end = start - by // 2, end + by - by // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)
