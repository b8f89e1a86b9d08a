"""One PNG that shows every variant of an A/B test side by side, each cell labelled with its weights.

A 2-D grid sweep is laid out as a grid (rows = the first LoRA's weights, columns = the second's);
anything else is one row. With several seeds a cell holds the variant's images left to right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

GUTTER = 4  # around and between cells
PADDING = 2  # around the label text
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class SheetLayout:
    rows: int
    cols: int
    cell_width: int  # at least the images' width; wider when a label needs it
    image_height: int
    label_height: int  # the band under each cell's images
    image_origins: list[tuple[int, int]]  # per variant: top-left of its first image

    @property
    def size(self) -> tuple[int, int]:
        width = self.cols * self.cell_width + (self.cols + 1) * GUTTER
        height = self.rows * (self.image_height + self.label_height) + (self.rows + 1) * GUTTER
        return width, height


def render_contact_sheet(
    cells: Sequence[Sequence[Image.Image]], labels: Sequence[Sequence[str]], rows: int, cols: int
) -> tuple[Image.Image, SheetLayout]:
    """`cells[i]` are variant i's images (same size, one per seed); `labels[i]` its label lines."""
    if len(cells) != rows * cols or len(labels) != len(cells):
        raise ValueError(f"{len(cells)} cells and {len(labels)} labels do not fill {rows} x {cols}")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = _line_height(measure, font)
    image_width, image_height = cells[0][0].size
    images_width = image_width * max(len(c) for c in cells)
    widest_label = max((measure.textlength(line, font=font) for lines in labels for line in lines), default=0)
    cell_width = max(images_width, int(widest_label + 0.999) + 2 * PADDING)
    label_height = max(len(lines) for lines in labels) * line_height + 2 * PADDING

    origins = []
    for i in range(len(cells)):
        row, col = divmod(i, cols)
        x = GUTTER + col * (cell_width + GUTTER) + (cell_width - images_width) // 2
        y = GUTTER + row * (image_height + label_height + GUTTER)
        origins.append((x, y))
    layout = SheetLayout(rows, cols, cell_width, image_height, label_height, origins)

    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for images, lines, (x, y) in zip(cells, labels, origins, strict=True):
        for k, image in enumerate(images):
            sheet.paste(image.convert("RGB"), (x + k * image_width, y))
        cell_left = x - (cell_width - images_width) // 2
        for n, line in enumerate(lines):
            draw.text((cell_left + PADDING, y + image_height + PADDING + n * line_height), line, fill=INK, font=font)
    return sheet, layout


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag|0.9", font=font)
    return bottom + 2
