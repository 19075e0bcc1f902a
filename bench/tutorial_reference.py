"""Time per epoch: the Pokedex tutorial's own Keras pipeline vs imgclf, on the same photos.

The reference side reproduces the tutorial (PyImageSearch, "Keras and Convolutional Neural
Networks", 2018) as published: every image decoded with its full resolution, resized to
96x96 and held in memory as float32 / 255; an 80/20 split; Keras' ``ImageDataGenerator``
(rotation 25, shift 0.1, shear 0.2, zoom 0.2, horizontal flip, nearest fill) feeding
SmallerVGGNet through ``model.fit``; Adam 1e-3, batch 32. The imgclf side is
``imgclf train --recipe tutorial`` (same network, augmentation and optimiser) on the same
folder. Both use all cores. Runs alternate (Keras, imgclf, Keras, imgclf, ...) so background
load hits both alike; the first epoch of each run (graph tracing, decode cache) is reported
but the comparison uses the later ones, as training images per second.

TensorFlow is not an imgclf dependency. The ``bench`` extra (``pip install 'imgclf[bench]'``)
names it; its own venv avoids version clashes with the rest (point ``--tf-python`` at it):

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu scipy pillow
    python bench/tutorial_reference.py --tf-python /tmp/tfvenv/bin/python [--epochs 3 --rounds 2]

Writes bench/results/tutorial_reference.json. Data: $IMGCLF_SHARED (default ../shared/datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED", ROOT.parent / "shared" / "datasets"))
SIGN = SHARED / "sign-language-digits"

# Run by --tf-python as a separate process: nothing from imgclf is imported there.
KERAS_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
import tensorflow as tf
from tensorflow import keras
from tensorflow.keras import layers
try:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator
except ImportError:
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

folder, epochs, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
data, labels = [], []
for i, c in enumerate(classes):
    for f in sorted((folder / c).iterdir()):
        img = Image.open(f).convert("RGB").resize((96, 96), Image.BILINEAR)  # tutorial: cv2.resize
        data.append(np.asarray(img, dtype="float32") / 255.0)
        labels.append(i)
data, labels = np.stack(data), keras.utils.to_categorical(labels, len(classes))
load_s = time.perf_counter() - t0
rng = np.random.default_rng(seed)
idx = rng.permutation(len(data))
n_tr = int(0.8 * len(data))
trainX, trainY = data[idx[:n_tr]], labels[idx[:n_tr]]

def smallervggnet(n):
    m = keras.Sequential([keras.Input((96, 96, 3))])
    m.add(layers.Conv2D(32, 3, padding="same")); m.add(layers.Activation("relu"))
    m.add(layers.BatchNormalization()); m.add(layers.MaxPooling2D(3)); m.add(layers.Dropout(0.25))
    for f in (64, 128):
        for _ in range(2):
            m.add(layers.Conv2D(f, 3, padding="same")); m.add(layers.Activation("relu"))
            m.add(layers.BatchNormalization())
        m.add(layers.MaxPooling2D(2)); m.add(layers.Dropout(0.25))
    m.add(layers.Flatten()); m.add(layers.Dense(1024)); m.add(layers.Activation("relu"))
    m.add(layers.BatchNormalization()); m.add(layers.Dropout(0.5))
    m.add(layers.Dense(n)); m.add(layers.Activation("softmax"))
    return m

model = smallervggnet(len(classes))
model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"])
aug = ImageDataGenerator(rotation_range=25, width_shift_range=0.1, height_shift_range=0.1,
                         shear_range=0.2, zoom_range=0.2, horizontal_flip=True, fill_mode="nearest")
times = []
class T(keras.callbacks.Callback):
    def on_epoch_begin(self, e, logs=None): self.t = time.perf_counter()
    def on_epoch_end(self, e, logs=None): times.append(time.perf_counter() - self.t)
# No steps_per_epoch: with Keras 3 a step count below the iterator's length leaves the next
# epoch a stub of the leftover batches. Each epoch is one full pass, the last batch partial.
model.fit(aug.flow(trainX, trainY, batch_size=32, seed=seed), epochs=epochs, verbose=0, callbacks=[T()])
print(json.dumps({"epoch_s": times, "images_per_epoch": len(trainX), "load_s": load_s,
                  "tf": tf.__version__, "keras": keras.__version__}))
"""


def keras_run(tf_python: str, script: str, args: list[str]) -> dict[str, Any]:
    """Run ``script`` (Keras code) under ``tf_python``; its last stdout line is a JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        out = subprocess.run([tf_python, path, *args], capture_output=True, text=True, env=env)
    finally:
        os.unlink(path)
    if out.returncode != 0:
        raise RuntimeError(f"Keras reference failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tf_available(tf_python: str) -> bool:
    """True when ``tf_python`` imports TensorFlow; otherwise says how to get it."""
    probe = subprocess.run([tf_python, "-c", "import tensorflow"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(
            f"error: {tf_python} cannot import tensorflow. Install it (pip install tensorflow-cpu scipy "
            "pillow), in its own venv if you like, and pass --tf-python PATH",
            file=sys.stderr,
        )
    return probe.returncode == 0


def imgclf_run(folder: Path, epochs: int, runs: Path, i: int) -> dict[str, Any]:
    from imgclf.training.api import train
    from imgclf.training.recipes import config_from

    cfg = config_from(
        {"data": str(folder), "model": "smallervggnet", "recipe": "tutorial", "epochs": epochs}
        | {"out": str(runs / f"imgclf{i}"), "tensorboard": False, "cache_dir": str(runs / "cache")}
    )
    res = train(cfg, progress=False)
    n = len(json.loads((res.run_dir / "splits.json").read_text())["train"])
    bs = cfg.batch_size
    return {"epoch_s": [h["time_s"] for h in res.history], "images_per_epoch": n // bs * bs}


def img_s(run: dict[str, Any]) -> float:
    """Training images per second over the epochs after the first."""
    later = run["epoch_s"][1:] or run["epoch_s"]
    return run["images_per_epoch"] / st.median(later)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tf-python", default=sys.executable, help="Python with TensorFlow (default: this one)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not compared)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating Keras/imgclf rounds")
    ap.add_argument("--data", type=Path, default=SIGN, help="photos, a folder per class (default: Sign)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tutorial_reference.json"))
    a = ap.parse_args(argv)
    if not tf_available(a.tf_python):
        return 2
    if not a.data.is_dir():
        print(f"error: {a.data} not found; set IMGCLF_SHARED or pass --data", file=sys.stderr)
        return 2
    runs = Path(tempfile.mkdtemp(prefix="imgclf-tutref-"))
    rows: dict[str, list[dict[str, Any]]] = {"keras_tutorial": [], "imgclf": []}
    load = [os.getloadavg()]
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}: Keras tutorial pipeline ...", file=sys.stderr, flush=True)
        args = [str(a.data), str(a.epochs), str(42 + r)]
        rows["keras_tutorial"].append(keras_run(a.tf_python, KERAS_SCRIPT, args))
        print(f"round {r + 1}/{a.rounds}: imgclf --recipe tutorial ...", file=sys.stderr, flush=True)
        rows["imgclf"].append(imgclf_run(a.data, a.epochs, runs, r))
        load.append(os.getloadavg())
    speeds = {k: [img_s(x) for x in v] for k, v in rows.items()}
    k, m = st.median(speeds["keras_tutorial"]), st.median(speeds["imgclf"])
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "data": str(a.data),
        "cpus": os.cpu_count(),
        "load_avg": load,
        "epochs": a.epochs,
        "runs": rows,
        "img_s": speeds,
        "speedup": m / k,
        "keras": rows["keras_tutorial"][0].get("keras"),
    }
    print("\nSmallerVGGNet 96x96, tutorial augmentation, batch 32 (training images per second, epochs 2+)")
    print(f"{'pipeline':<22}{'img/s':>8}{'s per 1,000 images':>22}")
    for name, v in (("Keras tutorial", k), ("imgclf", m)):
        print(f"{name:<22}{v:>8.1f}{1000 / v:>22.1f}")
    print(f"imgclf is {m / k:.2f}x the tutorial's training speed", end="; ")
    print(f"load average {load[0][0]:.1f} -> {load[-1][0]:.1f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
