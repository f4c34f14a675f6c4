"""``rexfast serve``: a local web page (Gradio) for one or more models, and its API.

Needs the ``serve`` extra (``pip install -e ".[serve]"``): :func:`build_app` makes the page
for :class:`rexfast.Segmenter` objects, :func:`launch` serves it on 127.0.0.1. The checks
(:mod:`rexfast.serve.checks`) and the example rows (:mod:`rexfast.serve.examples`) import
without gradio; the page is imported on first access.
"""

from __future__ import annotations

_APP = ("build_app", "launch", "ServeLimits", "UploadedImage", "MASK_COLOUR")


def __getattr__(name):
    if name in _APP:
        try:
            from . import app
        except ImportError as exc:  # gradio is an optional extra
            if (getattr(exc, "name", None) or "").split(".")[0] in ("gradio", "gradio_client"):
                raise ImportError(f"rexfast serve needs gradio: pip install -e \".[serve]\" ({exc})") from exc
            raise
        return getattr(app, name)
    raise AttributeError(f"module 'rexfast.serve' has no attribute {name!r}")


__all__ = list(_APP)
