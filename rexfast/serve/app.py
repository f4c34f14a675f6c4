"""The web page of ``rexfast serve``: a Gradio app around one or more :class:`rexfast.Segmenter`.

::

    from rexfast import Segmenter
    from rexfast.serve import build_app, launch

    app = build_app({"ReLA": Segmenter.from_pretrained("runs/demo/train/best")})
    launch(app, host="127.0.0.1", port=7860)

The page: an image upload, a sentence box, a mask-threshold slider and example rows; per
model (side by side when there are two or more) the overlay (``gr.AnnotatedImage``: the
image and the mask as its one annotation), the verdict ("no target" with its probability,
or the share of the image segmented, and where the tokenizer cut the sentence), the mask
PNG to download and the answer as JSON; an "Explain" tab with the figure of what each
model grouped (:mod:`rexfast.engine.explain_figure`), computed when the tab is open.

The API (``gradio_client``): ``/predict`` takes ``image, text, mask_threshold`` and returns,
per model in order, the overlay (``{"image": base image, "annotations": [{"image": mask
PNG (RGBA, alpha 255 on the mask), "label": model}]}``), the verdict, the answer as JSON
(``no_target``, ``no_target_prob``, ``no_target_reason``, ``pixels``, ``share``, ``height``,
``width``, ``mask_threshold``, ``sentence_pieces``, ``pieces_read``) and the mask PNG;
``/explain`` takes the same inputs and returns each model's figure.

A server treats every upload as hostile (:mod:`rexfast.serve.checks`): the queue runs
``concurrency`` requests at a time and holds at most ``max_queue`` waiting; uploads over
``max_file_size`` are refused by Gradio; an image over ``max_pixels`` is refused from its
header before it is decoded; a file that is not an image, an empty or over-long sentence,
or a bad threshold gets a message in the page, never a traceback; and an unexpected
failure in one request is logged on the server and answered with a message, while the
server goes on serving.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: nothing leaves the machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from ..engine.predictor import sentence_slug  # noqa: E402
from ..engine.segmenter import OVERLAY_COLOUR, Segmentation, Segmenter  # noqa: E402
from .checks import (DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SENTENCE_CHARS,  # noqa: E402
                     RequestError, check_image_size, check_sentence, check_threshold, open_image, sentence_cut)

log = logging.getLogger("rexfast.serve")

MASK_COLOUR = "#{:02x}{:02x}{:02x}".format(*OVERLAY_COLOUR)
FILE_AGE_S = 600  # mask PNGs handed out are kept this long for their download
# system fonts only: the page loads nothing from outside the machine
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts. ``max_pixels``: the largest image (width × height);
    ``max_sentence_chars``: the longest sentence; ``max_file_size``: the largest upload
    (Gradio's: an int of bytes or a string such as ``"50mb"``); ``concurrency``: requests
    computed at once (torch already spreads one request over the CPU cores); ``max_queue``:
    requests waiting beyond those (more are refused with "the queue is full")."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_sentence_chars: int = DEFAULT_MAX_SENTENCE_CHARS
    max_file_size: Union[int, str] = DEFAULT_MAX_FILE_SIZE
    concurrency: int = 1
    max_queue: int = 64

    def __post_init__(self):
        for name in ("max_pixels", "max_sentence_chars", "concurrency", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.max_file_size, bool) or not isinstance(self.max_file_size, (int, str)):
            raise TypeError(f"max_file_size must be bytes (int) or a size such as '50mb', got {self.max_file_size!r}")


class UploadedImage(gr.Image):
    """Gradio's image upload, read by :func:`rexfast.serve.checks.open_image`: its size is
    checked from the header before any pixel is decoded, and every refusal is a message
    (Gradio's own preprocessing would decode it first and raise a bare exception)."""

    is_template = True  # the browser draws it with Gradio's Image component

    def __init__(self, *, max_pixels: int = DEFAULT_MAX_PIXELS, **kwargs):
        super().__init__(type="pil", image_mode="RGB", **kwargs)
        self.max_pixels = max_pixels

    def get_config(self, cls=None):
        # the browser's props are gr.Image's (its __init__'s parameters), not this one's
        return super().get_config(cls or gr.Image)

    def preprocess(self, payload):
        if payload is None:
            return None
        if getattr(payload, "path", None) is None:
            raise gr.Error("send the image as an uploaded file (gradio_client: handle_file(path))")
        try:
            return open_image(payload.path, max_pixels=self.max_pixels, name=getattr(payload, "orig_name", None))
        except RequestError as exc:
            raise gr.Error(str(exc), print_exception=False) from None


def _named(segmenters) -> list[tuple[str, Segmenter]]:
    if isinstance(segmenters, Segmenter):
        segmenters = [segmenters]
    if isinstance(segmenters, Mapping):
        entries = [(str(name), seg) for name, seg in segmenters.items()]
    elif isinstance(segmenters, Sequence) and not isinstance(segmenters, str):
        names = [type(seg.model).__name__ if isinstance(seg, Segmenter) else "?" for seg in segmenters]
        entries = [(f"{name} {i + 1}" if names.count(name) > 1 else name, seg)
                   for i, (name, seg) in enumerate(zip(names, segmenters))]
    else:
        raise TypeError(f"segmenters must be a Segmenter, a list of them or a dict name -> Segmenter, got "
                        f"{type(segmenters).__name__}")
    if not entries:
        raise ValueError("segmenters is empty: give at least one Segmenter")
    for name, seg in entries:
        if not isinstance(seg, Segmenter):
            raise TypeError(f"segmenters[{name!r}] must be a rexfast Segmenter, got {type(seg).__name__}")
    if len({name for name, _ in entries}) != len(entries):
        raise ValueError(f"model names must differ, got {[name for name, _ in entries]}")
    return entries


def _page_message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _guard(fn):
    """Every failure of a request becomes a message in the page (``gr.Error``), never a traceback;
    an unexpected one is logged here with its traceback."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except (RequestError, ValueError, TypeError, FileNotFoundError) as exc:
            raise gr.Error(_page_message(exc), print_exception=False) from None
        except MemoryError:
            raise gr.Error("the server ran out of memory on this image: try a smaller one",
                           print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - a server answers every request
            log.exception("request failed")
            raise gr.Error(f"the server failed on this request ({type(exc).__name__}: {_page_message(exc)}); "
                           "it keeps serving", print_exception=False) from None

    return wrapper


class _Files:
    """The mask PNGs handed out for download: one folder per request, removed after ``FILE_AGE_S``."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="rexfast-serve-"))
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        now = time.time()
        with self._lock:
            for old in self.root.iterdir():
                try:
                    if now - old.stat().st_mtime > FILE_AGE_S:
                        shutil.rmtree(old, ignore_errors=True)
                except FileNotFoundError:
                    pass
            folder = self.root / uuid.uuid4().hex
            folder.mkdir()
        return folder


class _Page:
    """The request handlers, holding the models and the limits."""

    def __init__(self, entries, limits: ServeLimits):
        self.entries = entries
        self.limits = limits
        self.files = _Files()

    # -- inputs --------------------------------------------------------------------------------
    def _inputs(self, image, text, mask_threshold):
        if image is None:
            raise RequestError("upload an image first")
        check_image_size(image, max_pixels=self.limits.max_pixels)
        _, first = self.entries[0]
        text = check_sentence(text, max_chars=self.limits.max_sentence_chars, tokenizer=first.tokenizer,
                              max_tokens=first.preprocessing.max_tokens)
        return image, text, check_threshold(mask_threshold)

    # -- /predict ------------------------------------------------------------------------------
    def predict(self, image, text, mask_threshold):
        image, text, mt = self._inputs(image, text, mask_threshold)
        folder = self.files.new_folder()
        outputs, warned = [], set()
        for name, seg in self.entries:
            result = seg(image, text, mask_threshold=mt)
            cut = sentence_cut(seg.tokenizer, text, seg.preprocessing.max_tokens)
            note = cut.describe()
            if note and note not in warned:
                warned.add(note)
                gr.Warning(note[0].upper() + note[1:])
            mask_path = folder / f"{sentence_slug(text) or 'sentence'}_{_file_part(name)}_mask.png"
            from PIL import Image

            Image.fromarray((result.mask * 255).astype(np.uint8)).save(mask_path)
            outputs += [(image, [(result.mask.astype(np.float32), name)]), _verdict(result, note),
                        _answer(result, cut), str(mask_path)]
        return outputs

    # -- /explain ------------------------------------------------------------------------------
    def explain(self, image, text, mask_threshold):
        import io

        from PIL import Image

        from ..engine.explain_figure import explain_png

        image, text, mt = self._inputs(image, text, mask_threshold)
        figures = []
        for _, seg in self.entries:
            result = seg(image, text, mask_threshold=mt, explain=True)
            figures.append(Image.open(io.BytesIO(explain_png(result))))
        return _outputs(figures)

    def explain_when_open(self, image, text, mask_threshold, tab="explain"):
        """The figures for the Explain tab when it is the one shown (an empty tab otherwise, so
        that no stale figure stays beside a new answer); quiet while the inputs are incomplete."""
        if tab != "explain" or image is None or not isinstance(text, str) or not text.strip():
            return _outputs([None] * len(self.entries))
        return self.explain(image, text, mask_threshold)

    def explain_on_open(self, image, text, mask_threshold):
        return self.explain_when_open(image, text, mask_threshold)


def _outputs(values: list):
    """An event's return value: Gradio takes one output's value bare, several as a list."""
    return values[0] if len(values) == 1 else values


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "model"


def _verdict(result: Segmentation, note: str) -> str:
    if result.no_target:
        text = result.explanation
    else:
        h, w = result.size
        pixels = int(result.mask.sum())
        text = (f"{100.0 * pixels / (h * w):.1f}% of the image segmented ({pixels:,} of {h * w:,} pixels)"
                + ("" if result.no_target_prob is None else f"; no-target probability {result.no_target_prob:.2f}"))
    return text + (f". Note: {note}." if note else "")


def _answer(result: Segmentation, cut) -> dict:
    h, w = result.size
    pixels = int(result.mask.sum())
    return {"no_target": bool(result.no_target), "no_target_prob": result.no_target_prob,
            "no_target_reason": result.no_target_reason, "pixels": pixels, "share": pixels / float(h * w),
            "height": h, "width": w, "mask_threshold": result.mask_threshold,
            "no_target_threshold": result.no_target_threshold, "sentence_pieces": cut.pieces, "pieces_read": cut.read}


def _header(entries, sources) -> str:
    lines = ["# rexfast: segment what a sentence names",
             "Upload an image, say what to segment, press **Segment**. The mask is painted magenta; "
             "the **Explain** tab shows what each model grouped to find it."]
    for i, (name, seg) in enumerate(entries):
        spec = seg.preprocessing
        source = f" `{sources[i]}`" if sources and i < len(sources) and sources[i] else ""
        kind = type(seg.model).__name__
        lines.append(f"- **{name}**{'' if name == kind else f' ({kind})'}{source}: input {spec.image_size}², "
                     f"{spec.max_tokens} tokens, {seg.precision} on {seg.device.type}")
    return "\n".join(lines)


EXPLAIN_HELP = (
    "**CGFormer**: at each decoder stage (coarse to fine) every token claims the pixels where its hard "
    "assignment wins; the ★ referent token's pixels are what the mask head reads. **ReLA**: the minimap "
    "says how much each image region is the target; the strongest regions' masks are shown weighted by it, "
    "and their weighted sum decides each pixel (> 0: target).")


def build_app(segmenters, *, examples: Optional[Sequence[tuple[str, str]]] = None,
              limits: Optional[ServeLimits] = None, sources: Optional[Sequence[str]] = None,
              title: str = "rexfast") -> gr.Blocks:
    """The page for ``segmenters`` (a Segmenter, a list, or a dict name → Segmenter; two or
    more answer side by side), with ``examples`` as (image path, sentence) rows, queued
    with ``limits`` (:class:`ServeLimits`). ``sources`` (one per model) are shown in the
    header. Launch it with :func:`launch`."""
    entries = _named(segmenters)
    limits = limits or ServeLimits()
    if not isinstance(limits, ServeLimits):
        raise TypeError(f"limits must be a ServeLimits, got {type(limits).__name__}")
    page = _Page(entries, limits)
    default_threshold = entries[0][1].mask_threshold
    with gr.Blocks(title=title, delete_cache=(FILE_AGE_S, FILE_AGE_S), analytics_enabled=False) as app:
        gr.Markdown(_header(entries, sources))
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                image = UploadedImage(label="image", max_pixels=limits.max_pixels, sources=["upload", "clipboard"],
                                      height=300, elem_id="rexfast-image")
                text = gr.Textbox(label="sentence", placeholder="the red circle left of the blue square", lines=1,
                                  max_lines=3, elem_id="rexfast-text")
                threshold = gr.Slider(0.01, 0.99, value=default_threshold, step=0.01, label="mask threshold",
                                      info="a pixel is in the mask where its probability exceeds this",
                                      elem_id="rexfast-threshold")
                button = gr.Button("Segment", variant="primary", elem_id="rexfast-submit")
                if examples:
                    gr.Examples(examples=[[img, sentence] for img, sentence in examples], inputs=[image, text],
                                label="examples (click one)", examples_per_page=12)
            with gr.Column(scale=2):
                tab = gr.State("answer")
                with gr.Tabs():
                    with gr.Tab("Answer", id="answer") as answer_tab:
                        outputs = []
                        with gr.Row(equal_height=False):
                            for index, (name, _) in enumerate(entries):
                                with gr.Column(min_width=280):
                                    overlay = gr.AnnotatedImage(label=name, format="png", height=360,
                                                                color_map={name: MASK_COLOUR},
                                                                elem_id=f"rexfast-overlay-{index}")
                                    verdict = gr.Textbox(label=f"{name}: verdict", interactive=False, lines=2,
                                                         elem_id=f"rexfast-verdict-{index}")
                                    with gr.Accordion("answer as JSON", open=False):
                                        answer = gr.JSON(label=f"{name}: answer")
                                    mask = gr.File(label=f"{name}: mask PNG", elem_id=f"rexfast-mask-{index}")
                                    outputs += [overlay, verdict, answer, mask]
                    with gr.Tab("Explain", id="explain") as explain_tab:
                        gr.Markdown(EXPLAIN_HELP)
                        explain_button = gr.Button("Explain this answer", elem_id="rexfast-explain")
                        with gr.Row():
                            figures = [gr.Image(label=f"{name}: what it grouped", type="pil", format="png",
                                                interactive=False, elem_id=f"rexfast-explain-{index}")
                                       for index, (name, _) in enumerate(entries)]
        private = {"api_visibility": "private", "queue": False}
        answer_tab.select(lambda: "answer", None, tab, **private)
        explain_tab.select(lambda: "explain", None, tab, **private)
        predicted = gr.on(triggers=[button.click, text.submit], fn=_guard(page.predict),
                          inputs=[image, text, threshold], outputs=outputs, api_name="predict",
                          concurrency_limit=limits.concurrency, concurrency_id="models")
        predicted.success(_guard(page.explain_when_open), inputs=[image, text, threshold, tab], outputs=figures,
                          api_visibility="private", concurrency_limit=limits.concurrency, concurrency_id="models")
        explain_tab.select(_guard(page.explain_on_open), inputs=[image, text, threshold], outputs=figures,
                           api_visibility="private", concurrency_limit=limits.concurrency, concurrency_id="models")
        explain_button.click(_guard(page.explain), inputs=[image, text, threshold], outputs=figures,
                             api_name="explain", concurrency_limit=limits.concurrency, concurrency_id="models")
    app.rexfast_page = page  # the handlers, for tests and the load benchmark
    app.rexfast_limits = limits
    return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: Optional[int] = 7860, block: bool = True,
           quiet: bool = False):
    """Queue and start ``app`` on ``host:port`` (127.0.0.1 by default: nothing is reachable from
    another machine unless asked; no share link is ever made). ``block=False`` returns at once
    (tests). Returns what ``gr.Blocks.launch`` returns: (app, local URL, share URL)."""
    limits: ServeLimits = getattr(app, "rexfast_limits", None) or ServeLimits()
    app.queue(max_size=limits.max_queue, default_concurrency_limit=limits.concurrency)
    return app.launch(server_name=host, server_port=port, max_file_size=limits.max_file_size, show_error=True,
                      prevent_thread_lock=not block, share=False, inbrowser=False, quiet=quiet, theme=THEME,
                      ssr_mode=False, mcp_server=False)


__all__ = ["build_app", "launch", "ServeLimits", "UploadedImage", "MASK_COLOUR"]
