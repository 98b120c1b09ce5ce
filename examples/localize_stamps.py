"""Where is the sound? The Python API on one stamps scene (notebook-style: run it, or paste the cells).

    python examples/localize_stamps.py [--engine ENGINE_DIR_OR_CHECKPOINT] [--out DIR]

Without ``--engine`` it exports a tiny SSL-Align with random weights (a few seconds): that shows the API,
not a meaningful heatmap. For a real one, train and export first (README "Using it"), e.g.
``avloc export --checkpoint runs/cpu/best.pt --out engines/cpu`` and pass ``--engine engines/cpu``.
Writes ``OUT/overlay.png`` (heatmap, peak, and the sounding object's true box in green).
"""

# %% setup
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2

import avloc
from avloc.localize import draw

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--engine", type=Path, default=None, help="engine folder or checkpoint (default: a tiny one)")
parser.add_argument("--out", type=Path, default=Path("example_out"), help="output folder")
args = parser.parse_args()
out = args.out
out.mkdir(parents=True, exist_ok=True)

# %% 1. a stamps scene: real photo cut-outs, one sounding its real recording (tuxpaint-stamps-default)
from avloc.core.data.stamps import make_stamps  # noqa: E402

data = out / "scene"
if not (data / "test.json").is_file():
    make_stamps(data, seed=3, n_train=1, n_val=1, n_test=1, silent_frac=0.0, image_size=160, workers=1)
scene = json.loads((data / "test.json").read_text())[0]
image, sound = data / "frames" / f"{scene['file']}.jpg", data / "audio" / f"{scene['file']}.wav"
print(f"scene {scene['file']}: {scene['class']} sounding among {[o['class'] for o in scene['objects']]}")

# %% 2. an engine: the one given, or a tiny random-weights export (what `avloc export` writes)
engine = args.engine
if engine is None:
    from avloc.core.audio import FrontEndConfig
    from avloc.core.checkpoint import ImageConfig, save_checkpoint
    from avloc.core.ssl_align import SSLAlign, SSLAlignConfig
    from avloc.engines.export import export_engine

    engine = out / "tiny_engine"
    if not (engine / "manifest.json").is_file():
        save_checkpoint(
            out / "tiny.pt",
            SSLAlign(SSLAlignConfig(width=8)),
            method="ssl_align",
            model_config={"width": 8},
            frontend=FrontEndConfig(kind="linear", window_seconds=3.0),
            image=ImageConfig(size=64),
        )
        export_engine(out / "tiny.pt", engine, force=True)

# %% 3. localize: an image and a sound in, a heatmap at the image's size out
loc = avloc.Localizer(engine)
r = loc(image, sound)
x0, y0, x1, y1 = scene["bbox"][0]  # the sounding object's box, 0..1
# r.peak is None only when a letterbox engine's peak falls in its padding (never for a square image like this one)
assert r.peak is not None
inside = x0 <= r.peak[0] <= x1 and y0 <= r.peak[1] <= y1
print(f"peak {r.peak_px} px ({r.peak[0]:.2f}, {r.peak[1]:.2f}), confidence {r.confidence:.3f}, visible {r.visible}")
print(f"heatmap {r.heatmap.shape}; peak inside the sounding {scene['class']}: {inside}")

# %% 4. the overlay (the live display's drawing) with the true box, saved
bgr = cv2.imread(str(image))
picture = draw(bgr, r, {"alpha": 0.45, "colormap": cv2.COLORMAP_JET})
h, w = picture.shape[:2]
cv2.rectangle(picture, (int(x0 * w), int(y0 * h)), (int(x1 * w), int(y1 * h)), (0, 255, 0), 2)
cv2.imwrite(str(out / "overlay.png"), picture)
print(f"overlay: {out / 'overlay.png'}")
