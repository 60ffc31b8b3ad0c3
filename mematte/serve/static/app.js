"use strict";
// The try-it page: send a photo with a mask, a trimap or a painted trimap to /v1/matte
// (output=rgba), show the alpha and the cutout, offer both for download.
const $ = (id) => document.getElementById(id);
const photoCanvas = $("photo-canvas"), trimapCanvas = $("trimap-canvas");
let photoFile = null, guideFile = null, painting = false;

const guideKind = () => document.querySelector("input[name=guide]:checked").value;
const brushValue = () => Number(document.querySelector("input[name=brush]:checked").value);

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function ready() {
  $("run").disabled = !(photoFile && (guideKind() === "paint" || guideFile));
}

async function loadPhoto(file) {
  const bitmap = await createImageBitmap(file);  // EXIF orientation applied, as the server does
  for (const c of [photoCanvas, trimapCanvas]) { c.width = bitmap.width; c.height = bitmap.height; }
  photoCanvas.getContext("2d").drawImage(bitmap, 0, 0);
  const t = trimapCanvas.getContext("2d");
  t.fillStyle = "rgb(0,0,0)";  // a painted trimap starts as all background
  t.fillRect(0, 0, bitmap.width, bitmap.height);
}

function paintAt(event) {
  const box = trimapCanvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * trimapCanvas.width / box.width;
  const y = (event.clientY - box.top) * trimapCanvas.height / box.height;
  const radius = Number($("brush-size").value) * trimapCanvas.width / box.width / 2;
  const t = trimapCanvas.getContext("2d");
  const v = brushValue();
  t.fillStyle = `rgb(${v},${v},${v})`;
  t.beginPath();
  t.arc(x, y, radius, 0, 2 * Math.PI);
  t.fill();
}

function showAlpha(cutout) {
  // the alpha is the cutout's alpha channel (both are 8-bit PNGs of the same matte)
  const c = $("alpha");
  c.width = cutout.naturalWidth; c.height = cutout.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(cutout, 0, 0);
  const pixels = g.getImageData(0, 0, c.width, c.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) { d[i] = d[i + 1] = d[i + 2] = d[i + 3]; d[i + 3] = 255; }
  g.putImageData(pixels, 0, 0);
  c.toBlob((blob) => {
    const a = $("download-alpha");
    a.href = URL.createObjectURL(blob); a.hidden = false;
  }, "image/png");
}

async function run() {
  const form = new FormData();
  form.append("image", photoFile, "image");
  if (guideKind() === "paint") {
    const blob = await new Promise((done) => trimapCanvas.toBlob(done, "image/png"));
    form.append("trimap", blob, "trimap.png");
  } else {
    form.append(guideKind(), guideFile, guideKind());
  }
  form.append("output", "rgba");
  const headers = {};
  if ($("api-key").value) headers["X-API-Key"] = $("api-key").value;
  say("matting…");
  $("run").disabled = true;
  const started = performance.now();
  try {
    const response = await fetch("/v1/matte", { method: "POST", body: form, headers });
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message += ": " + (await response.json()).error; } catch (e) { /* not JSON */ }
      say(message, true);
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const cutout = $("cutout");
    cutout.onload = () => {
      showAlpha(cutout);
      say(`done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
      cutout.dataset.done = "1";
    };
    cutout.src = url;
    const a = $("download-cutout");
    a.href = url; a.hidden = false;
  } catch (e) {
    say(`request failed: ${e}`, true);
  } finally {
    ready();
  }
}

$("photo").addEventListener("change", async (e) => {
  photoFile = e.target.files[0] || null;
  if (photoFile) await loadPhoto(photoFile);
  ready();
});
$("guide-file").addEventListener("change", (e) => { guideFile = e.target.files[0] || null; ready(); });
for (const radio of document.querySelectorAll("input[name=guide]")) {
  radio.addEventListener("change", () => {
    const paint = guideKind() === "paint";
    $("brushes").hidden = !paint;
    $("paint-wrap").hidden = !paint;
    $("guide-file").hidden = paint;
    ready();
  });
}
trimapCanvas.addEventListener("pointerdown", (e) => { painting = true; paintAt(e); });
trimapCanvas.addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
window.addEventListener("pointerup", () => { painting = false; });
$("run").addEventListener("click", run);

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("model").textContent = `${h.model} on ${h.device}, ${h.dtype}`;
  $("key-row").hidden = !h.api_key_required;
});
