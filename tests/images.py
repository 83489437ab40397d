"""Tiny synthetic images for tests (the dataset is never committed)."""

from io import BytesIO

from PIL import Image, ImageDraw


def image_bytes(width=64, height=64, *, format="JPEG", mode="RGB", seed=0) -> bytes:
    image = Image.new(mode, (width, height), color=0)
    draw = ImageDraw.Draw(image)
    # A bright blob whose place depends on the seed, so different seeds give different bytes.
    x, y = 4 + seed % (max(width - 12, 1)), 4 + (seed * 7) % (max(height - 12, 1))
    draw.ellipse((x, y, x + 8, y + 8), fill=255 if mode == "L" else (255, 255, 255))
    buffer = BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()
