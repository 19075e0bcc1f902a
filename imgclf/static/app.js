// imgclf web page: upload images to /v1/predict, show top-5 bars, optional Grad-CAM overlay.
// Plain JavaScript, no external assets, so the page works offline.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { items: [], thresholds: null }; // items: {file, url, camUrl, card}; thresholds: multi-label

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function pct(p) {
  return (p * 100).toFixed(p >= 0.9995 || p < 0.0005 ? 1 : 2) + "%";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return `${body.error}: ${body.detail}`;
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

async function loadModelInfo() {
  try {
    const resp = await fetch("/v1/model");
    const m = await resp.json();
    if (m.task === "multi-label") state.thresholds = Object.fromEntries(m.classes.map((c, i) => [c, m.thresholds[i]]));
    const size = m.input && m.input.size ? m.input.size.join("×") : "?";
    const mm = m.metrics || {};
    const which = mm.test_accuracy != null ? "test" : (mm.val_accuracy != null ? "validation" : null);
    const acc = which ? ` · ${which} accuracy ${pct(mm[`${which === "test" ? "test" : "val"}_accuracy`])}` : "";
    $("#model-info").textContent =
      `${m.architecture} · ${m.classes.length} ${state.thresholds ? "labels (multi-label)" : "classes"} · ` +
      `input ${size}${acc} · ${m.sha256.slice(0, 12)}`;
  } catch (e) {
    $("#model-info").textContent = "could not load model information";
  }
}

function makeCard(file) {
  const card = document.createElement("article");
  card.className = "card";
  const img = document.createElement("img");
  img.alt = file.name;
  const name = document.createElement("p");
  name.className = "name";
  name.textContent = file.name;
  const pred = document.createElement("p");
  pred.className = "pred";
  pred.textContent = "classifying…";
  const bars = document.createElement("div");
  bars.className = "bars";
  card.append(img, name, pred, bars);
  $("#results").prepend(card);
  return { card, img, pred, bars };
}

function barRow(name, prob, on, threshold) {
  const row = document.createElement("div");
  row.className = "bar-row" + (on ? " top" : "");
  const lbl = document.createElement("span");
  lbl.className = "lbl";
  lbl.textContent = name;
  lbl.title = name;
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(0, Math.min(100, prob * 100))}%`;
  bar.append(fill);
  if (threshold != null) {
    // Multi-label: the label is predicted when its bar reaches this mark.
    const mark = document.createElement("i");
    mark.className = "threshold";
    mark.style.left = `${Math.max(0, Math.min(100, threshold * 100))}%`;
    mark.title = `threshold ${pct(threshold)}`;
    bar.append(mark);
  }
  const num = document.createElement("span");
  num.className = "pct";
  num.textContent = pct(prob);
  row.append(lbl, bar, num);
  return row;
}

function showLabelSet(item, p) {
  // Multi-label: the predicted set, then one bar per label with its threshold marked.
  item.pred.textContent = "";
  const label = document.createElement("span");
  label.className = "pred-label";
  label.textContent = p.labels.length ? p.labels.join(", ") : "no label";
  item.pred.append(label);
  item.bars.textContent = "";
  const on = new Set(p.labels);
  Object.entries(p.probabilities)
    .sort((a, b) => b[1] - a[1])
    .forEach(([name, prob]) => {
      const th = state.thresholds ? state.thresholds[name] : null;
      item.bars.append(barRow(name, prob, on.has(name), th));
    });
}

function showPrediction(item, p) {
  if (Array.isArray(p.labels)) return showLabelSet(item, p);
  item.pred.textContent = "";
  const label = document.createElement("span");
  label.className = "pred-label";
  label.textContent = p.label;
  item.pred.append(label, ` ${pct(p.probability)}`);
  if (p.unknown) {
    // The best class is still shown: the score only says the image looks like none of the classes.
    const unk = document.createElement("span");
    unk.className = "unknown";
    unk.textContent = "unknown";
    unk.title = `unknown-image score ${p.ood_score.toPrecision(4)} is past the model's threshold`;
    item.pred.prepend(unk, " ");
    item.card.classList.add("is-unknown");
  }
  item.bars.textContent = "";
  p.top_k.forEach((t, i) => item.bars.append(barRow(t.label, t.probability, i === 0, null)));
}

function showError(item, text) {
  item.pred.textContent = "";
  const e = document.createElement("span");
  e.className = "error";
  e.textContent = text;
  item.pred.append(e);
}

async function showCam(item) {
  if (!$("#cam-toggle").checked) {
    item.img.src = item.url;
    item.img.dataset.cam = "0";
    return;
  }
  if (!item.camUrl) {
    const resp = await fetch("/v1/explain", {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: item.file,
    });
    if (!resp.ok) {
      setStatus(`Grad-CAM for ${item.file.name}: ${await errorText(resp)}`, true);
      return;
    }
    item.camUrl = URL.createObjectURL(await resp.blob());
  }
  if ($("#cam-toggle").checked) {
    item.img.src = item.camUrl;
    item.img.dataset.cam = "1";
  }
}

async function classify(files) {
  const images = Array.from(files);
  if (!images.length) return;
  const items = images.map((file) => {
    const item = { file, url: URL.createObjectURL(file), camUrl: null, ...makeCard(file) };
    item.img.src = item.url;
    state.items.push(item);
    return item;
  });
  setStatus(`classifying ${items.length} image${items.length > 1 ? "s" : ""}…`);
  // One request per image: a bad file only fails its own card, and the server batches them.
  const t0 = performance.now();
  let failed = 0;
  await Promise.all(items.map(async (item) => {
    const form = new FormData();
    form.append("file", item.file, item.file.name);
    try {
      const resp = await fetch("/v1/predict?top_k=5", { method: "POST", body: form });
      if (!resp.ok) {
        failed += 1;
        showError(item, await errorText(resp));
        return;
      }
      const body = await resp.json();
      showPrediction(item, body.predictions[0]);
      await showCam(item);
    } catch (e) {
      failed += 1;
      showError(item, `request failed: ${e}`);
    }
  }));
  const ms = Math.round(performance.now() - t0);
  setStatus(`${items.length - failed} classified, ${failed} failed, in ${ms} ms`, failed > 0);
}

function init() {
  loadModelInfo();
  const drop = $("#drop");
  const input = $("#file-input");
  input.addEventListener("change", () => {
    classify(input.files);
    input.value = "";
  });
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => classify(e.dataTransfer.files));
  $("#cam-toggle").addEventListener("change", () => state.items.forEach((it) => showCam(it)));
  $("#clear").addEventListener("click", () => {
    state.items.forEach((it) => {
      URL.revokeObjectURL(it.url);
      if (it.camUrl) URL.revokeObjectURL(it.camUrl);
    });
    state.items = [];
    $("#results").textContent = "";
    setStatus("");
  });
}

document.addEventListener("DOMContentLoaded", init);
