"""The far-OOD test set: images that are not brain MRI slices, built offline and
deterministically from what installed packages bundle plus generated images.

    from ml.far_ood import build_far_ood
    images = build_far_ood(seed=0)          # [FarOODImage(category, name, data), ...]
    python -m ml.far_ood --out DIR          # writes them as files, to look at

Categories (nothing is downloaded; no image is committed to the repository):
- photo_colour: crops of the sample photos scikit-learn (china.jpg, flower.jpg) and
  matplotlib (grace_hopper.jpg, Minduka_Present_Blue_Pack.png, logo2.png) ship.
- photo_gray: the same crops in grayscale (the colour check cannot catch these).
- document: rendered text pages ("document scans") with Pillow and matplotlib's DejaVu
  fonts: paragraphs, tables, forms; slightly rotated, grey paper, scanner noise.
- noise: uniform, Gaussian, salt-and-pepper and colour noise, and noise blurred to
  several scales (smooth noise is not "rough", so only the feature score can catch it).
- blank: black, white and grey images, with faint noise.
- gradient: linear and radial gradients, stripes, checkerboards.
- xray_like: synthetic chest radiographs (lung fields, ribs, spine, heart, diaphragm).
- ct_like: synthetic axial body CT slices (body outline, fat ring, lungs or liver,
  vertebra, aorta, table): black background and a bright ellipse, like an MRI slice.
- dicom_ct / dicom_other: pydicom's bundled test files of non-MR modalities (CT; NM, US,
  SEG, OT, RT dose), rendered to 8 bits the way diagnostics/dicom.py renders uploads
  (modality LUT, first window or min..max, MONOCHROME1 inverted; colour kept as RGB).
  MR files are left out (they are in-distribution-ish). matplotlib's s1045.ima (a brain
  MRI slice) is left out of the photos for the same reason.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CATEGORIES = (
    "photo_colour",
    "photo_gray",
    "document",
    "noise",
    "blank",
    "gradient",
    "xray_like",
    "ct_like",
    "dicom_ct",
    "dicom_other",
)
SIZE = 512
WORDS = (
    "patient report invoice total date signature page section results summary the of and "
    "to in for is on with by this that be are from at as your all have new more an was we "
    "will home can us about if page has search free but our one other do no information "
    "time they site he up may what which their news out use any there see only so his when "
    "contact here business who web also now help get pm view online first am been would how"
).split()


@dataclass(frozen=True)
class FarOODImage:
    category: str
    name: str
    data: bytes  # encoded (PNG or JPEG), what an upload would carry


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
        buffer, format="JPEG", quality=quality
    )
    return buffer.getvalue()


def _gray(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------- bundled photos


def sample_photo_paths() -> list[Path]:
    """The sample photos installed packages ship (those that are installed)."""
    paths = []
    try:
        import sklearn

        folder = Path(sklearn.__file__).parent / "datasets" / "images"
        paths += [folder / "china.jpg", folder / "flower.jpg"]
    except ImportError:
        pass
    try:
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "sample_data"
        paths += [folder / n for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")]
        paths += [folder / "logo2.png"]
    except ImportError:
        pass
    return [path for path in paths if path.is_file()]


def _photo_crops(rng: np.random.Generator, per_photo: int) -> list[tuple[str, Image.Image]]:
    crops = []
    for path in sample_photo_paths():
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        width, height = photo.size
        for index in range(per_photo):
            side = int(min(width, height) * rng.uniform(0.4, 1.0))
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crops.append((f"{path.stem}-{index}", crop))
    return crops


# ---------------------------------------------------------------- documents


def _font(size: int, bold: bool = False, mono: bool = False) -> ImageFont.ImageFont:
    try:
        import matplotlib

        name = "DejaVuSansMono" if mono else "DejaVuSerif" if size % 2 else "DejaVuSans"
        name += "-Bold" if bold else ""
        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf"
        return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def _document(rng: np.random.Generator, index: int) -> Image.Image:
    paper = int(rng.integers(215, 256))
    page = Image.new("L", (SIZE, int(SIZE * 1.3)), paper)
    draw = ImageDraw.Draw(page)
    ink = int(rng.integers(0, 70))
    margin = int(rng.integers(20, 60))
    y = margin
    draw.text((margin, y), " ".join(rng.choice(WORDS, 3)).title(), fill=ink, font=_font(26, True))
    y += 45
    kind = index % 3
    size = int(rng.integers(11, 17))
    font = _font(size, mono=kind == 2)
    while y < page.height - margin - size:
        if kind == 1 and rng.random() < 0.35:  # a table row
            columns = int(rng.integers(3, 6))
            width = (SIZE - 2 * margin) // columns
            for column in range(columns):
                x = margin + column * width
                draw.rectangle((x, y, x + width, y + size + 8), outline=ink)
                draw.text((x + 4, y + 3), str(rng.choice(WORDS)), fill=ink, font=font)
            y += size + 8
            continue
        if kind == 2 and rng.random() < 0.2:  # a form field
            draw.text((margin, y), f"{rng.choice(WORDS)}:", fill=ink, font=font)
            draw.line((margin + 90, y + size, SIZE - margin, y + size), fill=ink)
            y += size + 12
            continue
        line = " ".join(rng.choice(WORDS, int(rng.integers(5, 12))))
        draw.text((margin, y), line, fill=ink, font=font)
        y += int(size * 1.5)
        if rng.random() < 0.12:
            y += size  # paragraph break
    page = page.rotate(float(rng.uniform(-3, 3)), fillcolor=paper, resample=Image.BICUBIC)
    pixels = np.asarray(page, dtype=np.float32) + rng.normal(0, rng.uniform(1, 6), page.size[::-1])
    return _gray(pixels)


# ---------------------------------------------------------------- generated patterns


def _noise(rng: np.random.Generator, index: int) -> Image.Image:
    kind = index % 6
    shape = (SIZE, SIZE)
    if kind == 0:
        return _gray(rng.uniform(0, 256, shape))
    if kind == 1:
        return _gray(rng.normal(128, 50, shape))
    if kind == 2:
        pixels = np.full(shape, 128.0)
        pixels[rng.random(shape) < 0.2] = 0
        pixels[rng.random(shape) < 0.2] = 255
        return _gray(pixels)
    if kind == 3:
        colour = rng.uniform(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
        return Image.fromarray(colour, mode="RGB")
    # Smooth noise: blurred to a scale of a few to tens of pixels, contrast restored.
    radius = float(rng.choice([2, 4, 8, 16, 32]))
    blurred = _gray(rng.uniform(0, 256, shape)).filter(ImageFilter.GaussianBlur(radius))
    pixels = np.asarray(blurred, dtype=np.float32)
    pixels = (pixels - pixels.mean()) / max(pixels.std(), 1e-6) * rng.uniform(30, 60) + 110
    return _gray(pixels)


def _blank(rng: np.random.Generator, index: int) -> Image.Image:
    level = [0, 255, 128, 30, 220][index % 5] if index < 5 else int(rng.integers(0, 256))
    return _gray(level + rng.normal(0, rng.uniform(0, 1.5), (SIZE, SIZE)))


def _gradient(rng: np.random.Generator, index: int) -> Image.Image:
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    kind = index % 4
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        pixels = (np.cos(angle) * xx + np.sin(angle) * yy) * 255
    elif kind == 1:
        cy, cx = rng.uniform(0.2, 0.8, 2)
        pixels = 255 - np.hypot(yy - cy, xx - cx) / 0.8 * 255
    elif kind == 2:
        period = rng.uniform(0.02, 0.2)
        pixels = 127 + 127 * np.sin(2 * np.pi * (xx if rng.random() < 0.5 else yy) / period)
    else:
        cells = int(rng.integers(2, 16))
        pixels = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 255
    return _gray(pixels)


# ---------------------------------------------------------------- synthetic X-ray and CT


def _ellipse_mask(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    return ((x * c + y * s) / rx) ** 2 + ((-x * s + y * c) / ry) ** 2 < 1


def _xray(rng: np.random.Generator) -> Image.Image:
    """A posteroanterior chest radiograph: bright body, dark lungs, ribs, spine, heart."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    width = rng.uniform(0.40, 0.48)
    body = _ellipse_mask(yy, xx, 0.62, 0.5, 0.62, width)
    pixels = np.where(body, rng.uniform(150, 190), rng.uniform(10, 40))
    # Shoulders/neck: the body widens at the top.
    pixels[(yy < 0.2) & (np.abs(xx - 0.5) < 0.12)] = rng.uniform(150, 190)
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.17, 0.21)
        lung = _ellipse_mask(yy, xx, 0.52, cx, rng.uniform(0.27, 0.33), rng.uniform(0.12, 0.15))
        pixels = np.where(lung, rng.uniform(40, 75), pixels)
        # Ribs: bright arcs across each lung field.
        for rib in range(9):
            y0 = 0.28 + rib * rng.uniform(0.045, 0.055)
            arc = y0 + 0.6 * (xx - 0.5) ** 2
            band = np.abs(yy - arc) < 0.009
            pixels = np.where(band & lung, pixels + rng.uniform(50, 80), pixels)
        # Clavicle.
        clavicle = np.abs(yy - (0.23 + 0.25 * (xx - 0.5) ** 2)) < 0.012
        pixels = np.where(clavicle & (np.abs(xx - cx) < 0.16), 215, pixels)
    spine = (np.abs(xx - 0.5) < 0.035) & (yy > 0.15)
    pixels = np.where(spine, pixels + 55, pixels)
    heart = _ellipse_mask(yy, xx, 0.63, 0.53, 0.14, rng.uniform(0.12, 0.16), 0.4)
    pixels = np.where(heart, np.maximum(pixels, rng.uniform(160, 190)), pixels)
    diaphragm = yy > 0.8 - 0.25 * (xx - 0.5) ** 2 - 0.04 * np.abs(np.sin(xx * 9))
    pixels = np.where(diaphragm & body, rng.uniform(170, 200), pixels)
    image = _gray(pixels + rng.normal(0, 6, pixels.shape))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.5)))


def _ct(rng: np.random.Generator) -> Image.Image:
    """An axial chest or abdomen CT slice in a soft-tissue window."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    rx, ry = rng.uniform(0.36, 0.45), rng.uniform(0.24, 0.32)
    cy = 0.5
    outer = _ellipse_mask(yy, xx, cy, 0.5, ry, rx)
    inner = _ellipse_mask(yy, xx, cy, 0.5, ry - 0.03, rx - 0.035)
    pixels = np.zeros((SIZE, SIZE))
    pixels[outer] = rng.uniform(60, 80)  # subcutaneous fat
    pixels[inner] = rng.uniform(105, 125)  # muscle / soft tissue
    chest = rng.random() < 0.5
    if chest:
        for side in (-1, 1):
            lung = _ellipse_mask(yy, xx, cy - 0.02, 0.5 + side * rx * 0.45, ry * 0.7, rx * 0.35)
            pixels[lung] = rng.uniform(0, 15)
        pixels[_ellipse_mask(yy, xx, cy - 0.02, 0.52, ry * 0.35, rx * 0.22)] = 125  # heart
    else:
        liver = _ellipse_mask(yy, xx, cy - 0.03, 0.5 - rx * 0.4, ry * 0.6, rx * 0.4, 0.3)
        pixels[liver & inner] = rng.uniform(130, 145)
        for _ in range(int(rng.integers(4, 10))):  # bowel gas
            gy, gx = cy + rng.uniform(-0.1, 0.15), 0.5 + rng.uniform(0.0, rx * 0.7)
            pixels[_ellipse_mask(yy, xx, gy, gx, 0.02, 0.03)] = 5
        for side in (-1, 1):  # kidneys
            kidney = _ellipse_mask(yy, xx, cy + ry * 0.45, 0.5 + side * 0.12, 0.05, 0.03)
            pixels[kidney] = 150
    vertebra = _ellipse_mask(yy, xx, cy + ry * 0.62, 0.5, 0.055, 0.05)
    pixels[vertebra] = 240
    pixels[_ellipse_mask(yy, xx, cy + ry * 0.62, 0.5, 0.035, 0.03)] = 160
    pixels[_ellipse_mask(yy, xx, cy + ry * 0.3, 0.47, 0.025, 0.025)] = 150  # aorta
    table = np.abs(yy - (cy + ry + 0.06) - 0.3 * (xx - 0.5) ** 2) < 0.006
    pixels[table & (np.abs(xx - 0.5) < 0.4)] = 180
    pixels += rng.normal(0, rng.uniform(4, 10), pixels.shape)
    return _gray(pixels).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))


# ---------------------------------------------------------------- pydicom test files


def pydicom_test_files() -> list[Path]:
    """pydicom's bundled test files (the folder in the package; never its downloads)."""
    try:
        import pydicom.data
    except ImportError:
        return []
    return sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def _render_dicom(dataset, window: bool) -> Image.Image | None:
    """8-bit rendering as diagnostics/dicom.py does it; colour images stay RGB."""
    from pydicom.pixels import apply_modality_lut

    pixels = dataset.pixel_array
    frames = int(dataset.get("NumberOfFrames") or 1)
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if frames > 1:
        pixels = pixels[0]
    if min(pixels.shape[:2]) < 32:
        return None  # thumbnails (3x3, 10x10) are not uploads the app accepts either
    if samples == 3:
        if photometric.startswith("YBR") and dataset.file_meta.TransferSyntaxUID.is_compressed:
            pass  # pydicom already converted JPEG-coded YBR to RGB
        elif photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        if pixels.dtype != np.uint8:
            bits = int(dataset.get("BitsStored") or 8 * pixels.dtype.itemsize)
            pixels = np.round(pixels / (2.0**bits - 1) * 255)
        return Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, dataset)
        if rgb.dtype != np.uint8:
            rgb = (rgb / 256).astype(np.uint8)
        return Image.fromarray(rgb, mode="RGB")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if window and center is not None and width is not None:
        center = float(center[0] if hasattr(center, "__len__") else center)
        width = float(width[0] if hasattr(width, "__len__") else width)
        if width >= 1:
            low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    scaled = np.clip((values - low) / (high - low), 0, 1) if high > low else values * 0
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return _gray(np.round(scaled * 255))


def _dicom_images() -> list[FarOODImage]:
    import warnings

    import pydicom

    images = []
    seen = set()  # several test files hold the same picture in other encodings: keep one
    for path in pydicom_test_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dataset = pydicom.dcmread(path)
                modality = str(dataset.get("Modality") or "").strip()
                if modality in ("", "MR") or "PixelData" not in dataset:
                    continue
                renders = [_render_dicom(dataset, window=True)]
                if dataset.get("WindowCenter") is not None:
                    renders.append(_render_dicom(dataset, window=False))
        except Exception:  # undecodable test files (deliberately broken ones) are skipped
            continue
        category = "dicom_ct" if modality == "CT" else "dicom_other"
        for index, image in enumerate(r for r in renders if r is not None):
            thumbnail = np.asarray(image.convert("L").resize((16, 16)), dtype=np.uint8) // 32
            if thumbnail.tobytes() in seen:
                continue
            seen.add(thumbnail.tobytes())
            for flip in (False, True):
                shown = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
                name = f"{modality}-{path.stem}-{index}{'-flip' if flip else ''}"
                images.append(FarOODImage(category, name, _png(shown)))
    return images


# ---------------------------------------------------------------- the set


def build_far_ood(seed: int = 0, per_category: int = 40) -> list[FarOODImage]:
    """The far-OOD set, the same bytes for the same seed and installed packages."""
    rng = np.random.default_rng(seed)
    images: list[FarOODImage] = []
    per_photo = max(1, per_category // max(len(sample_photo_paths()), 1))
    for name, crop in _photo_crops(rng, per_photo):
        images.append(FarOODImage("photo_colour", name, _jpeg(crop)))
        images.append(FarOODImage("photo_gray", name, _jpeg(crop.convert("L"))))
    for index in range(per_category):
        images.append(FarOODImage("document", f"document-{index}", _jpeg(_document(rng, index))))
        images.append(FarOODImage("noise", f"noise-{index}", _png(_noise(rng, index))))
        images.append(FarOODImage("gradient", f"gradient-{index}", _png(_gradient(rng, index))))
        images.append(FarOODImage("xray_like", f"xray-{index}", _png(_xray(rng))))
        images.append(FarOODImage("ct_like", f"ct-{index}", _png(_ct(rng))))
    for index in range(per_category // 2):
        images.append(FarOODImage("blank", f"blank-{index}", _png(_blank(rng, index))))
    images += _dicom_images()
    return sorted(images, key=lambda image: (CATEGORIES.index(image.category), image.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the images into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    counts: dict[str, int] = {}
    for image in build_far_ood(args.seed):
        folder = out / image.category
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if image.data[:4] == b"\x89PNG" else ".jpg"
        (folder / f"{image.name}{suffix}").write_bytes(image.data)
        counts[image.category] = counts.get(image.category, 0) + 1
    for category, count in counts.items():
        print(f"{category}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
