"""Unknown-image scores (imgclf.runtime.ood): features, scorers, ONNX parity, state, thresholds, real data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from imgclf.core.errors import BundleError, ConfigError
from imgclf.models.registry import create_model, get_spec, list_models
from imgclf.runtime import ood

K, D = 5, 24


@pytest.fixture(scope="module")
def synthetic() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of 5 Gaussian classes with distinct means, labels, and random logits."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (600,), generator=g)
    centres = torch.randn(K, D, generator=g) * 3
    f = centres[y] + torch.randn(600, D, generator=g)
    logits = torch.randn(600, K, generator=g) * 2
    return f, y, logits


def _fit_all(f: torch.Tensor, y: torch.Tensor) -> dict[str, ood.OodScorer]:
    return {kind: ood.fit_scorer(kind, f, y, K, temperature=1.5) for kind in ood.SCORES}


def test_default_is_a_score() -> None:
    assert ood.DEFAULT_SCORE in ood.SCORES


@pytest.mark.parametrize("name", list_models())
def test_features_and_logits_every_registered_model(name: str) -> None:
    spec = get_spec(name)
    classes = 2 if spec.binary_head_for_two_classes else 4
    model = create_model(name, num_classes=classes).eval()
    x = torch.randn(3, spec.default_channels, spec.default_size, spec.default_size)
    with torch.no_grad():
        feats, logits = ood.features_and_logits(model, x)
        plain = model(x)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert feats.shape == (3, head.in_features)
    assert torch.equal(logits, plain)
    # The features really are what the head sees: applying it gives the logits back.
    torch.testing.assert_close(head(feats), logits)
    # The hook is removed after the call.
    assert not head._forward_hooks


def test_model_without_linear_head_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no nn.Linear"):
        ood.features_and_logits(nn.Sequential(nn.Conv2d(1, 3, 1), nn.Flatten()), torch.zeros(1, 1, 4, 4))


def test_scores_match_their_definitions(synthetic) -> None:
    f, y, logits = synthetic
    s = _fit_all(f, y)
    t = 1.5
    torch.testing.assert_close(s["msp"](f, logits), -torch.softmax(logits / t, 1).max(1).values)
    torch.testing.assert_close(s["energy"](f, logits), -t * torch.logsumexp(logits / t, 1))

    # Mahalanobis: tied covariance of class-centred features with Ledoit-Wolf shrinkage, on raw
    # features and on L2-normalised ones (the default).
    from sklearn.covariance import LedoitWolf

    def mahalanobis(x: np.ndarray, q: np.ndarray) -> np.ndarray:
        yn = y.numpy()
        mu = np.stack([x[yn == c].mean(0) for c in range(K)])
        prec = LedoitWolf(assume_centered=True).fit(x - mu[yn]).precision_
        return np.min([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in mu], axis=0)

    x = f.double().numpy()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for normalize, data in ((False, x), (True, xn)):
        sc = ood.fit_scorer("mahalanobis", f, y, K, normalize=normalize)
        got = sc(f[:50], logits[:50]).numpy()
        np.testing.assert_allclose(got, mahalanobis(data, data[:50]), rtol=1e-3, atol=1e-2)
    assert s["mahalanobis"].normalize is ood.DEFAULT_NORMALIZE

    # knn: squared distance to the k-th nearest unit-normalised training embedding (bank = all 600).
    z = torch.nn.functional.normalize(f, dim=1)
    q = f[:50] + torch.randn(50, D, generator=torch.Generator().manual_seed(1))
    zq = torch.nn.functional.normalize(q, dim=1)
    for k in (1, 10):
        want_knn = torch.cdist(zq, z).topk(k, largest=False).values[:, -1] ** 2
        got_knn = ood.fit_scorer("knn", f, y, K, k=k)(q, logits[:50])
        torch.testing.assert_close(got_knn, want_knn, rtol=1e-4, atol=1e-5)
    assert s["knn"].k == ood.DEFAULT_K
    for kind, sc in s.items():
        assert sc(f[:7], logits[:7]).shape == (7,), kind


def test_feature_scores_separate_far_points(synthetic) -> None:
    f, y, logits = synthetic
    s = _fit_all(f, y)
    far = f[:100] + 25.0  # shifted well away from every class
    for kind in ("mahalanobis", "knn"):
        inside, outside = s[kind](f[:100], logits[:100]), s[kind](far, logits[:100])
        assert ood.auroc(inside.numpy(), outside.numpy()) > 0.99, kind


def test_single_logit_head_is_logits_0_z() -> None:
    z = torch.linspace(-6, 6, 13)[:, None]
    two = torch.cat([torch.zeros_like(z), z], 1)
    for kind in ("msp", "energy"):
        sc = ood.fit_scorer(kind, torch.zeros(2, 3), torch.tensor([0, 1]), 2, temperature=2.0)
        torch.testing.assert_close(sc(torch.zeros(13, 3), z), sc(torch.zeros(13, 3), two))
    msp = ood.fit_scorer("msp", torch.zeros(2, 3), torch.tensor([0, 1]), 2)
    torch.testing.assert_close(msp(torch.zeros(13, 3), z), -torch.sigmoid(z.abs())[:, 0])


def test_knn_bank_is_bounded_and_seeded() -> None:
    f = torch.randn(800, 8)
    y = torch.zeros(800, dtype=torch.long)
    a = ood.fit_scorer("knn", f, y, 2, max_bank=300, k=3)
    b = ood.fit_scorer("knn", f, y, 2, max_bank=300, k=3)
    assert a.bank.shape == (300, 8) and torch.equal(a.bank, b.bank)
    torch.testing.assert_close(a.bank.norm(dim=1), torch.ones(300))
    with pytest.raises(ConfigError, match="k="):
        ood.fit_scorer("knn", f, y, 2, max_bank=300, k=301)
    with pytest.raises(ConfigError, match="unknown option"):
        ood.fit_scorer("msp", f, y, 2, k=3)
    with pytest.raises(ConfigError, match="choose one of"):
        ood.fit_scorer("odin", f, y, 2)


def test_onnx_parity_every_scorer(synthetic) -> None:
    ort = pytest.importorskip("onnxruntime")
    f, y, logits = synthetic
    for kind, sc in _fit_all(f, y).items():
        buf = io.BytesIO()
        torch.onnx.export(
            sc.eval(),
            (f[:4], logits[:4]),
            buf,
            opset_version=17,
            dynamo=False,
            input_names=["features", "logits"],
            output_names=["score"],
            dynamic_axes={"features": {0: "n"}, "logits": {0: "n"}, "score": {0: "n"}},
        )
        sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        q, lq = f[:37], logits[:37]  # another batch size than the traced one
        # msp/energy never read the features, so the exporter drops that input.
        feed = {"features": q.numpy(), "logits": lq.numpy()}
        (got,) = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
        want = sc(q, lq).detach().numpy()
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 1e-5 * scale, kind


def test_onnx_parity_model_with_features_hook() -> None:
    """The hook-based feature tap traces: image -> features/logits -> score in one graph."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model("lenet", num_classes=3).eval()
    tap = ood.FeaturesAndLogits(model)
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        feats, _ = tap(x)
    scorer = ood.fit_scorer("knn", feats, torch.arange(64) % 3, 3, k=5)

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tap, self.scorer = tap, scorer

        def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fz, lg = self.tap(img)
            return lg, self.scorer(fz, lg)

    g = Graph().eval()
    buf = io.BytesIO()
    torch.onnx.export(
        g, (x[:2],), buf, opset_version=17, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
    )
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    lg, sc = sess.run(None, {"x": x[:9].numpy()})
    with torch.no_grad():
        want_lg, want_sc = g(x[:9])
    np.testing.assert_allclose(lg, want_lg.numpy(), atol=1e-4)
    np.testing.assert_allclose(sc, want_sc.numpy(), atol=1e-4)


def test_state_round_trip_through_json_and_safetensors(synthetic) -> None:
    import json

    from safetensors.torch import load, save

    f, y, logits = synthetic
    for kind, sc in _fit_all(f, y).items():
        cfg = json.loads(json.dumps(sc.config()))
        tensors = load(save({k: v.contiguous() for k, v in sc.tensors().items()})) if sc.tensors() else {}
        back = ood.scorer_from_state(cfg, tensors)
        assert back.kind == kind and back.config() == sc.config()
        assert torch.equal(back(f, logits), sc(f, logits)), kind
        assert all(k.startswith(ood.PREFIX) for k in sc.tensors())


def test_bad_state_is_a_one_line_bundle_error(synthetic) -> None:
    f, y, _ = synthetic
    s = _fit_all(f, y)
    maha, knn = s["mahalanobis"], s["knn"]
    nan_whiten = {**maha.tensors(), "ood.whiten": torch.full_like(maha.whiten, float("nan"))}
    cases = [
        ("not a mapping", [], {}),
        ("kind=", {"kind": "odin"}, {}),
        ("temperature", {**s["energy"].config(), "temperature": -1}, {}),
        ("newer", {**s["msp"].config(), "version": 99}, {}),
        ("missing", maha.config(), {}),
        ("shape", {**maha.config(), "dims": D + 1}, maha.tensors()),
        ("not finite", maha.config(), nan_whiten),
        ("exceeds", {**knn.config(), "k": 10_000}, knn.tensors()),
        ("bank=", {**knn.config(), "bank": "600"}, knn.tensors()),
        ("normalize", {**maha.config(), "normalize": "yes"}, maha.tensors()),
    ]
    for match, cfg, tensors in cases:
        with pytest.raises(BundleError, match=match) as e:
            ood.scorer_from_state(cfg, tensors, where="model.json")  # type: ignore[arg-type]
        assert "\n" not in str(e.value) and str(e.value).startswith("model.json")


def test_threshold_rules() -> None:
    v = np.arange(100, dtype=float)  # scores 0..99
    assert ood.threshold_for_keep_rate(v, 0.95) == 94.0  # keeps exactly 95 of 100
    assert ood.threshold_for_keep_rate(v, 1.0) == 99.0
    # Negatives far above: raising the threshold keeps more known images and rejects all negatives.
    assert ood.threshold_for_keep_rate(v, 0.95, negative_scores=np.full(10, 500.0)) == 99.0
    # Negatives right above the 95 % point: the floor itself is best.
    assert ood.threshold_for_keep_rate(v, 0.95, negative_scores=np.linspace(94.5, 99.5, 50)) == 94.0
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="keep-rate"):
            ood.threshold_for_keep_rate(v, bad)
    with pytest.raises(ConfigError, match="no scores"):
        ood.threshold_for_keep_rate(np.array([]), 0.95)


def test_auroc() -> None:
    assert ood.auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert ood.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert ood.auroc(np.ones(5), np.ones(5)) == 0.5


# --------------------------------------------------------------------------- real data


def _images(bundle, spec: str, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from imgclf.data.sources import decode_items, index_source

    index = index_source(spec)
    idx = np.flatnonzero(index.split == split)
    idx = np.sort(np.random.default_rng(seed).choice(idx, min(n, len(idx)), replace=False))
    dec = decode_items(index, idx, bundle.pre, progress=False)
    return dec.images, dec.labels


def _features(bundle, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from imgclf.core.preprocess import normalize

    with torch.inference_mode():
        return ood.features_and_logits(bundle.model, normalize(torch.as_tensor(images), bundle.pre))


@pytest.fixture(scope="module")
def mnist_scores(mnist_bundle: Path, shared_dir: Path) -> dict[str, np.ndarray]:
    """DEFAULT_SCORE of a tiny MNIST LeNet on held-out MNIST (val/test) and Fashion-MNIST test."""
    import json

    import imgclf

    torch.set_num_threads(1)
    bundle = imgclf.load(mnist_bundle, backend="torch")
    rec = json.loads((Path(bundle.meta["run_dir"]) / "splits.json").read_text())
    from imgclf.data.sources import decode_items, index_source

    index = index_source("mnist")
    pos = {it: i for i, it in enumerate(index.items)}
    dec = {
        s: decode_items(index, np.asarray([pos[r] for r in rec[s]][:2000]), bundle.pre, progress=False)
        for s in ("train", "val")
    }
    ftr, _ = _features(bundle, dec["train"].images)
    scorer = ood.fit_scorer(ood.DEFAULT_SCORE, ftr, torch.as_tensor(dec["train"].labels), 10)
    test, _ = _images(bundle, "mnist", "test", 1000)
    fashion, _ = _images(bundle, "fashion-mnist", "test", 1000)
    out = {"val": dec["val"].images, "test": test, "fashion": fashion}
    with torch.inference_mode():
        return {k: scorer(*_features(bundle, v)).numpy() for k, v in out.items()}


def test_default_score_tells_fashion_from_digits(mnist_scores: dict[str, np.ndarray]) -> None:
    # Measured 0.9997 with this fixture (LeNet, 3,000 images, 2 epochs, 96 % test accuracy).
    assert ood.auroc(mnist_scores["test"], mnist_scores["fashion"]) > 0.95


def test_threshold_keeps_the_asked_share_of_real_scores(mnist_scores: dict[str, np.ndarray]) -> None:
    val, test, fashion = mnist_scores["val"], mnist_scores["test"], mnist_scores["fashion"]
    for keep in (0.9, 0.95, 0.99):
        thr = ood.threshold_for_keep_rate(val, keep)
        kept = float((val <= thr).mean())
        assert keep <= kept <= keep + 2 / len(val)
        # Held-out test digits are kept at about the same rate (same distribution).
        assert abs(float((test <= thr).mean()) - keep) < 0.04
    # With real negatives the rule never keeps fewer known images and rejects no fewer of them
    # than the plain threshold would, per its own objective.
    base = ood.threshold_for_keep_rate(val, 0.95)
    neg = ood.threshold_for_keep_rate(val, 0.95, negative_scores=fashion[:500])
    assert neg >= base

    def j(t: float) -> float:
        return float((val <= t).mean() + (fashion[:500] > t).mean())

    assert j(neg) >= j(base)


def test_covariance_sample_is_bounded(synthetic, monkeypatch: pytest.MonkeyPatch) -> None:
    f, y, logits = synthetic
    full = ood.fit_scorer("mahalanobis", f, y, K)
    monkeypatch.setattr(ood, "MAX_COV_ROWS", 200)
    part = ood.fit_scorer("mahalanobis", f, y, K)
    assert not torch.equal(part.whiten, full.whiten)  # the covariance came from the 200-row sample
    torch.testing.assert_close(part.center, full.center)  # means and centre still use every row
    far = f[:100] + 25.0
    assert ood.auroc(part(f[:100], logits[:100]).numpy(), part(far, logits[:100]).numpy()) > 0.99
