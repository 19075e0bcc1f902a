"""Test accuracy: the Fashion-MNIST MiniVGGNet tutorial run in Keras vs ``imgclf --recipe tutorial``.

The tutorial (PyImageSearch, "Fashion MNIST with Keras and Deep Learning", 2019) reports about
94 % test accuracy from one run, rounded. To tell a real gap from run-to-run noise, this bench
runs the tutorial's own Keras code on this machine beside imgclf's tutorial recipe, seed for
seed. Each pair runs at the same time, one process per core with one thread each, so both see
the same machine load.

Keras side, as published: MiniVGGNet (2x [conv3x3-ReLU-BN, conv3x3-ReLU-BN, pool 2, dropout
0.25] with 32/64 filters, dense 512-ReLU-BN, dropout 0.5, softmax), pixels / 255, SGD(lr 0.01,
momentum 0.9, decay 0.01/25) as Keras 3's InverseTimeDecay (the legacy ``decay`` argument's
formula, lr / (1 + decay * step)), batch 32, 25 epochs on all 60,000 training images, no
augmentation, the last weights evaluated on the 10,000 test images. The IDX files are read
from the shared copy (the tutorial's ``fashion_mnist.load_data()`` downloads the same files).

imgclf side: ``imgclf train --data fashion-mnist --model minivgg --recipe tutorial --seed S``.

TensorFlow is not an imgclf dependency; give it its own venv and point ``--tf-python`` at it:

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    python bench/tutorial_accuracy.py --tf-python /tmp/tfvenv/bin/python --seeds 1 2
    python bench/tutorial_accuracy.py ... --epochs 1 --subset 2000    # quick check, marked partial

Writes bench/results/tutorial_accuracy.json (merged per seed, so seeds can run separately).
Data: $IMGCLF_SHARED (default ../shared/datasets).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import SHARED, git_commit, load_avg  # noqa: E402
from tutorial_reference import keras_run, tf_available  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench" / "results" / "tutorial_accuracy.json"
FASHION = SHARED / "fashion-mnist"

# Run by --tf-python as a separate process: nothing from imgclf is imported there.
# argv: fashion-mnist dir, epochs, seed, subset (0 = all).
KERAS_SCRIPT = r"""
import gzip, json, sys, time
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from tensorflow import keras
from tensorflow.keras import layers

root, epochs, seed, subset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
keras.utils.set_random_seed(seed)

def idx(name, offset):
    with gzip.open(f"{root}/{name}", "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)

trainX = idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1).astype("float32") / 255.0
trainY = idx("train-labels-idx1-ubyte.gz", 8)
testX = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1).astype("float32") / 255.0
testY = idx("t10k-labels-idx1-ubyte.gz", 8)
if subset:
    pick = np.random.default_rng(seed).permutation(len(trainX))[:subset]
    trainX, trainY = trainX[pick], trainY[pick]
trainY, testY = keras.utils.to_categorical(trainY, 10), keras.utils.to_categorical(testY, 10)

m = keras.Sequential([keras.Input((28, 28, 1))])
for f in (32, 64):
    for _ in range(2):
        m.add(layers.Conv2D(f, 3, padding="same")); m.add(layers.Activation("relu"))
        m.add(layers.BatchNormalization(axis=-1))
    m.add(layers.MaxPooling2D(2)); m.add(layers.Dropout(0.25))
m.add(layers.Flatten()); m.add(layers.Dense(512)); m.add(layers.Activation("relu"))
m.add(layers.BatchNormalization()); m.add(layers.Dropout(0.5))
m.add(layers.Dense(10)); m.add(layers.Activation("softmax"))

lr = keras.optimizers.schedules.InverseTimeDecay(1e-2, decay_steps=1, decay_rate=1e-2 / 25)
m.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.SGD(lr, momentum=0.9),
          metrics=["accuracy"])
t0 = time.perf_counter()
h = m.fit(trainX, trainY, batch_size=32, epochs=epochs, verbose=0)
train_s = time.perf_counter() - t0
loss, acc = m.evaluate(testX, testY, batch_size=256, verbose=0)
print(json.dumps({"test_accuracy": float(acc), "test_loss": float(loss), "train_time_s": train_s,
                  "train_accuracy_last": float(h.history["accuracy"][-1]),
                  "params": int(m.count_params()), "tf": tf.__version__, "keras": keras.__version__}))
"""


def imgclf_cmd(seed: int, out: Path, epochs: int | None, subset: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", "fashion-mnist", "--model", "minivgg"]
    cmd += ["--recipe", "tutorial", "--seed", str(seed), "--threads", "1", "--no-progress"]
    cmd += ["--no-tensorboard", "--out", str(out)]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if subset:
        cmd += ["--subset", str(subset)]
    return cmd


def run_pair(
    tf_python: str, seed: int, tmp: Path, epochs: int | None, subset: int | None
) -> dict[str, dict[str, Any]]:
    """Keras and imgclf for one seed, at the same time, one core each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMGCLF_DATA_DIR": str(SHARED)}
    out = tmp / f"imgclf_{seed}"
    log = (tmp / f"imgclf_{seed}.log").open("w")
    ours = subprocess.Popen(imgclf_cmd(seed, out, epochs, subset), stdout=log, stderr=log, env=env, cwd=ROOT)
    keras = keras_run(tf_python, KERAS_SCRIPT, [str(FASHION), str(epochs or 25), str(seed), str(subset or 0)])
    ours.wait()
    log.close()
    if ours.returncode != 0:
        raise RuntimeError(f"imgclf train failed:\n{(tmp / f'imgclf_{seed}.log').read_text()[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    ours_row = {k: m[k] for k in ("test_accuracy", "test_loss", "train_time_s")}
    return {"keras": keras, "imgclf": ours_row}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tf-python", default=sys.executable, help="Python with TensorFlow (default: this one)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, help="override the tutorial's 25 epochs (marked partial)")
    ap.add_argument("--subset", type=int, help="train on N images (marked partial)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    a = ap.parse_args(argv)
    if not tf_available(a.tf_python):
        return 2
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        print(f"error: Fashion-MNIST IDX files not found in {FASHION}; set IMGCLF_SHARED", file=sys.stderr)
        return 2
    partial = bool(a.epochs or a.subset)
    key = "partial" if partial else "full"
    results = json.loads(a.json.read_text()) if a.json.exists() else {}
    runs = results.setdefault(key, {"runs": {}})["runs"]
    with tempfile.TemporaryDirectory(prefix="imgclf-tutacc-") as tmp:
        for seed in a.seeds:
            print(f"seed {seed}: Keras tutorial and imgclf tutorial recipe side by side", file=sys.stderr)
            la = load_avg()
            pair = run_pair(a.tf_python, seed, Path(tmp), a.epochs, a.subset)
            pair.update(load_avg_start=la, date=time.strftime("%Y-%m-%d %H:%M"), commit=git_commit())
            runs[str(seed)] = pair
            if partial:
                results[key]["overrides"] = {"epochs": a.epochs, "subset": a.subset}
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nFashion-MNIST MiniVGGNet tutorial ({key}): test accuracy %, train time s, one core each")
    print(f"{'seed':<6}{'Keras %':>9}{'imgclf %':>10}{'Keras s':>9}{'imgclf s':>10}")
    for seed, p in sorted(runs.items()):
        k, o = p["keras"], p["imgclf"]
        print(
            f"{seed:<6}{100 * k['test_accuracy']:>9.2f}{100 * o['test_accuracy']:>10.2f}"
            f"{k['train_time_s']:>9.0f}{o['train_time_s']:>10.0f}"
        )
    ka = [p["keras"]["test_accuracy"] for p in runs.values()]
    oa = [p["imgclf"]["test_accuracy"] for p in runs.values()]
    print(f"{'mean':<6}{100 * st.mean(ka):>9.2f}{100 * st.mean(oa):>10.2f}")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
