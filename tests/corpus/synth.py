"""Realistic inputs for the real-model corpus, rendered offline with Pillow and numpy.

Document pages (titles, paragraphs at several font sizes, tables, figures, page furniture), text lines,
captchas, photo-like scenes (gradients, shapes, texture, blur, noise) and speech-like audio (voiced
syllables with a moving pitch, fricative noise bursts, pauses). Every generator takes a seeded
``numpy.random.Generator``, so check data and calibration data come from disjoint seeds.
"""

from __future__ import annotations

import string
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WORDS = ["the", "model", "layer", "input", "output", "channel", "weight", "table", "figure", "section", "result", "data", "value", "page", "text", "line", "report", "number", "total", "method", "network", "image", "sample", "train", "test", "score", "error", "mean", "time", "level", "order", "field", "source", "form", "case", "state", "point", "group", "share", "north", "south", "market", "price", "annual", "review", "index", "summary"]


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font at ``size`` pixels (TrueType when FreeType is available)."""
    return ImageFont.load_default(size=size)


def words(rng: np.random.Generator, n: int) -> str:
    """``n`` random words, now and then a number."""
    out = [str(rng.integers(1, 2030)) if rng.random() < 0.1 else WORDS[rng.integers(len(WORDS))] for _ in range(n)]
    return " ".join(out)


def _ink(rng: np.random.Generator, dark: bool = True) -> tuple[int, int, int]:
    base = int(rng.integers(0, 70)) if dark else int(rng.integers(180, 256))
    return tuple(int(np.clip(base + rng.integers(-15, 16), 0, 255)) for _ in range(3))


def _paper(rng: np.random.Generator) -> tuple[int, int, int]:
    base = int(rng.integers(228, 256))
    return (base, base - int(rng.integers(0, 8)), base - int(rng.integers(0, 14)))


def _paragraph(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, width: int, size: int,
               lines: int, boxes: list) -> int:
    """Left-aligned lines of words that fit ``width``; returns the next free y."""
    f = font(size)
    for _ in range(lines):
        text = words(rng, 12)
        while len(text) > 3 and draw.textlength(text, font=f) > width:
            text = text.rsplit(" ", 1)[0]
        draw.text((x, y), text, fill=_ink(rng), font=f)
        boxes.append(draw.textbbox((x, y), text, font=f))
        y += int(size * 1.45)
    return y


def _table(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, width: int, boxes: list) -> int:
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
    size, cell_h, cell_w = int(rng.integers(11, 16)), 0, width // cols
    cell_h = int(size * 2)
    for r in range(rows + 1):
        draw.line([(x, y + r * cell_h), (x + cols * cell_w, y + r * cell_h)], fill=_ink(rng), width=1)
    for c in range(cols + 1):
        draw.line([(x + c * cell_w, y), (x + c * cell_w, y + rows * cell_h)], fill=_ink(rng), width=1)
    for r in range(rows):
        for c in range(cols):
            text = words(rng, 1) if r == 0 else f"{rng.uniform(0, 999):.1f}"
            pos = (x + c * cell_w + 4, y + r * cell_h + size // 3)
            draw.text(pos, text, fill=_ink(rng), font=font(size))
            boxes.append(draw.textbbox(pos, text, font=font(size)))
    return y + rows * cell_h + 12


def _figure(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int, width: int, height: int) -> int:
    draw.rectangle([x, y, x + width, y + height], outline=_ink(rng), width=1)
    points = np.cumsum(rng.normal(0, height / 12, 24)) + y + height / 2
    xs = np.linspace(x + 6, x + width - 6, len(points))
    draw.line(list(zip(xs, np.clip(points, y + 4, y + height - 4))), fill=(int(rng.integers(0, 200)), 60, 160),
              width=2)
    for i in range(int(rng.integers(3, 8))):
        bx = x + 10 + i * (width - 20) // 8
        draw.rectangle([bx, y + height - int(rng.integers(8, height // 2)), bx + 10, y + height - 2],
                       fill=_ink(rng, dark=False))
    return y + height + 10


def render_page(rng: np.random.Generator, width: int = 608, height: int = 800) -> tuple[Image.Image, list]:
    """A document page: header, title, paragraphs, a table or a figure with caption, a footer.

    Returns the RGB image and the bounding boxes (x0, y0, x1, y1) of every rendered text line.
    """
    img = Image.new("RGB", (width, height), _paper(rng))
    draw, boxes, margin = ImageDraw.Draw(img), [], int(width * 0.08)
    inner = width - 2 * margin
    draw.text((margin, 12), words(rng, 4), fill=_ink(rng), font=font(11))
    y = 40
    y = _paragraph(draw, rng, margin, y, inner, int(rng.integers(22, 34)), 1, boxes) + 8
    while y < height - 120:
        kind = rng.choice(["text", "text", "table", "figure"])
        if kind == "table":
            y = _table(draw, rng, margin, y, inner, boxes)
        elif kind == "figure":
            y = _figure(draw, rng, margin, y, inner, int(rng.integers(60, 140)))
            y = _paragraph(draw, rng, margin + 20, y, inner - 40, 11, 1, boxes)
        else:
            y = _paragraph(draw, rng, margin, y, inner, int(rng.integers(12, 19)), int(rng.integers(2, 7)), boxes)
        y += int(rng.integers(8, 20))
    draw.text((width // 2 - 10, height - 30), str(rng.integers(1, 300)), fill=_ink(rng), font=font(11))
    return _scan(img, rng), boxes


def _scan(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Scanner-like degradation: slight blur and sensor noise."""
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.8))))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(1, 6), (img.height, img.width, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_text_line(rng: np.random.Generator, text: str | None = None, size: int | None = None,
                     ) -> tuple[Image.Image, str]:
    """One line of text cropped with a small margin, as a detector's crop hands it to a recogniser."""
    text = text if text is not None else words(rng, int(rng.integers(1, 5)))
    size = size or int(rng.integers(22, 42))
    f = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=f)
    pad = int(size * rng.uniform(0.15, 0.4))
    img = Image.new("RGB", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), _paper(rng))
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, fill=_ink(rng), font=f)
    return _scan(img, rng), text


def render_captcha(rng: np.random.Generator, alphabet: str, length: int, width: int, height: int,
                   ) -> tuple[Image.Image, str]:
    """A captcha: jittered characters over a noisy tinted background with interference lines."""
    text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    size = int(height * rng.uniform(0.55, 0.75))
    step = (width - 10) / length
    for i, ch in enumerate(text):
        x = 5 + i * step + rng.uniform(0, step * 0.25)
        y = (height - size) / 2 + rng.uniform(-height * 0.1, height * 0.1) - size * 0.1
        draw.text((x, y), ch, fill=tuple(int(v) for v in rng.integers(0, 120, 3)), font=font(size))
    for _ in range(int(rng.integers(1, 4))):
        pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=1)
    return _scan(img, rng), text


CAPTCHA_DIGITS = string.digits
CAPTCHA_UPPER = string.digits + string.ascii_uppercase
CAPTCHA_LOWER = string.digits + string.ascii_lowercase


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like scene: sky/ground gradients, textured and shaded shapes, soft focus, sensor noise."""
    top, bottom = rng.uniform(40, 230, 3), rng.uniform(20, 200, 3)
    t = np.linspace(0, 1, height)[:, None, None]
    arr = (top * (1 - t) + bottom * t) * np.ones((1, width, 1))
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.1, 0.6) * width, rng.uniform(0.1, 0.6) * height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            corners = int(rng.integers(3, 7))
            draw.polygon([(float(x0 + rng.uniform(0, w)), float(y0 + rng.uniform(0, h))) for _ in range(corners)],
                         fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    arr = np.asarray(img, dtype=np.float32)
    shade = 0.75 + 0.5 * np.linspace(rng.uniform(0, 1), rng.uniform(0, 1), width)[None, :, None]
    texture = rng.normal(0, rng.uniform(3, 12), arr.shape)
    return Image.fromarray(np.clip(arr * shade + texture, 0, 255).astype(np.uint8))


def speech_like(rng: np.random.Generator, seconds: float, rate: int = 16000) -> np.ndarray:
    """Speech-like audio in [-1, 1]: voiced syllables (harmonics of a gliding pitch under a syllable envelope),
    fricative noise bursts and pauses over a low noise floor."""
    n = int(seconds * rate)
    out = rng.normal(0, 0.003, n)
    pos = int(rng.integers(0, rate // 4))
    while pos < n:
        length = int(rng.uniform(0.08, 0.3) * rate)
        seg = np.arange(min(length, n - pos))
        if rng.random() < 0.7:
            f0 = rng.uniform(90, 240) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * seg / rate))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            voice = sum(np.sin(k * phase) / k ** 1.2 for k in range(1, 12))
            env = np.sin(np.pi * seg / max(len(seg), 1)) ** 1.5
            out[pos:pos + len(seg)] += rng.uniform(0.05, 0.4) * env * voice
        else:
            burst = np.diff(rng.normal(0, 1, len(seg) + 1))
            out[pos:pos + len(seg)] += rng.uniform(0.02, 0.15) * burst * np.hanning(len(seg))
        pos += len(seg) + int(rng.uniform(0.02, 0.4) * rate)
    return np.clip(out, -1, 1).astype(np.float32)
