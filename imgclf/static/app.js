// imgclf web page: upload images to /v1/predict, show top-5 bars, optional Grad-CAM overlay.
// Plain JavaScript, no external assets, so the page works offline.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { items: [] }; // {file, url, camUrl, card}

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
    const size = m.input && m.input.size ? m.input.size.join("×") : "?";
    const mm = m.metrics || {};
    const which = mm.test_accuracy != null ? "test" : (mm.val_accuracy != null ? "validation" : null);
    const acc = which ? ` · ${which} accuracy ${pct(mm[`${which === "test" ? "test" : "val"}_accuracy`])}` : "";
    $("#model-info").textContent =
      `${m.architecture} · ${m.classes.length} classes · input ${size}${acc} · ${m.sha256.slice(0, 12)}`;
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

function showPrediction(item, p) {
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
  p.top_k.forEach((t, i) => {
    const row = document.createElement("div");
    row.className = "bar-row" + (i === 0 ? " top" : "");
    const lbl = document.createElement("span");
    lbl.className = "lbl";
    lbl.textContent = t.label;
    lbl.title = t.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(100, t.probability * 100))}%`;
    bar.append(fill);
    const num = document.createElement("span");
    num.className = "pct";
    num.textContent = pct(t.probability);
    row.append(lbl, bar, num);
    item.bars.append(row);
  });
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
