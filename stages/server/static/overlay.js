// Face boxes, landmarks and emotion labels drawn over the (mirrored, letterboxed) camera.
//
// Boxes and landmarks come in the pixels of the JPEG the page sent; `drawFaces` maps them
// onto the video as shown. Labels go above their box, inside it when the box touches the
// top edge, never outside the shown video, and never on top of another label
// (`placeLabels`, pure, so it can be tested without a browser).

const COLORS = { primary: "#4ade80", other: "#7dd3fc", plain: "#4ade80" };
export const LABEL_HEIGHT = 20;
const LABEL_PAD_X = 6;
const GAP = 2;
const FONT = "600 12px system-ui, sans-serif";

/**
 * Place one label per box. `items`: [{x, y, w, h, width}] (box and label width, in canvas
 * px), in priority order; `bounds`: {left, top, right, bottom}. Returns [{x, y, w, h}].
 */
export function placeLabels(items, bounds, height = LABEL_HEIGHT) {
  const placed = [];
  for (const item of items) {
    const w = Math.min(item.width, bounds.right - bounds.left);
    const fit = (x, y) => ({
      x: clamp(x, bounds.left, bounds.right - w),
      y: clamp(y, bounds.top, bounds.bottom - height),
      w, h: height,
    });
    const above = item.y - height;
    const preferred = fit(item.x, above >= bounds.top ? above : item.y);  // else inside, at the top
    const candidates = [preferred, fit(item.x, item.y + item.h)];        // then below the box
    for (const r of placed.filter((p) => overlaps(p, preferred))) {
      candidates.push(fit(r.x + r.w + GAP, preferred.y), fit(r.x - w - GAP, preferred.y),
        fit(preferred.x, r.y + r.h + GAP), fit(preferred.x, r.y - height - GAP));
    }
    let spot = candidates.find((c) => !placed.some((p) => overlaps(p, c)));
    if (!spot) {  // crowded: stack under the lowest label that is in the way
      spot = preferred;
      for (let i = 0; i < placed.length && placed.some((p) => overlaps(p, spot)); i++) {
        const lowest = Math.max(...placed.filter((p) => overlaps(p, spot)).map((p) => p.y + p.h));
        spot = fit(spot.x, lowest + GAP);
      }
    }
    placed.push(spot);
  }
  return placed;
}

export function overlaps(a, b) {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

function clamp(v, lo, hi) {
  return Math.max(lo, Math.min(v, Math.max(lo, hi)));
}

/** The label text of a face: emotion and confidence; the primary face gets a star. */
export function labelText(face) {
  const probs = face.emotion_probs && typeof face.emotion_probs === "object" ? face.emotion_probs : {};
  const values = Object.values(probs).filter((p) => typeof p === "number");
  const confidence = typeof probs[face.emotion] === "number" ? probs[face.emotion]
    : values.length ? Math.max(...values) : null;
  const text = [face.emotion ?? "face", confidence === null ? null : `${Math.round(confidence * 100)}%`]
    .filter(Boolean).join(" ");
  return face.primary === true ? `★ ${text}` : text;
}

function isBox(b) {
  return Array.isArray(b) && b.length === 4 && b.every((v) => typeof v === "number" && Number.isFinite(v));
}

/**
 * Draw `faces` over `video` on `canvas` (which covers the video's box). `input` is the
 * size of the JPEG the boxes refer to. Returns the labels' rectangles (CSS px).
 */
export function drawFaces(canvas, video, faces, input) {
  const box = video.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  const pw = Math.round(box.width * dpr);
  const ph = Math.round(box.height * dpr);
  if (canvas.width !== pw || canvas.height !== ph) { canvas.width = pw; canvas.height = ph; }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, box.width, box.height);
  const shown = (faces ?? []).filter((f) => f && isBox(f.bbox));
  if (!shown.length || !video.videoWidth || !input?.width) return [];

  // object-fit: contain letterboxes the video; it is mirrored, so x runs right to left.
  const scale = Math.min(box.width / video.videoWidth, box.height / video.videoHeight);
  const shownW = video.videoWidth * scale;
  const shownH = video.videoHeight * scale;
  const left = (box.width - shownW) / 2;
  const top = (box.height - shownH) / 2;
  const k = shownW / input.width;
  const mapX = (x) => left + shownW - x * k;
  const mapY = (y) => top + y * k;

  const anyPrimary = shown.some((f) => f.primary === true);
  const ordered = [...shown].sort((a, b) => (b.primary === true) - (a.primary === true));
  ctx.font = FONT;
  ctx.textBaseline = "middle";
  const items = ordered.map((face) => {
    const [x, y, w, h] = face.bbox;
    const text = labelText(face);
    return { face, text, x: mapX(x + w), y: mapY(y), w: w * k, h: h * k,
      width: Math.ceil(ctx.measureText(text).width) + 2 * LABEL_PAD_X };
  });
  const bounds = { left, top, right: left + shownW, bottom: top + shownH };
  const labels = placeLabels(items, bounds);

  items.forEach(({ face, x, y, w, h }) => {
    const color = !anyPrimary ? COLORS.plain : face.primary === true ? COLORS.primary : COLORS.other;
    ctx.strokeStyle = color;
    ctx.lineWidth = face.primary === true ? 3 : 2;
    ctx.strokeRect(x, y, w, h);
    if (Array.isArray(face.landmarks)) {
      ctx.fillStyle = color;
      ctx.lineWidth = 1.5;
      ctx.strokeStyle = "rgba(10, 12, 16, 0.85)";  // a dark ring keeps dots visible on any skin or wall
      for (const p of face.landmarks) {
        if (!Array.isArray(p) || !Number.isFinite(p[0]) || !Number.isFinite(p[1])) continue;
        ctx.beginPath();
        ctx.arc(mapX(p[0]), mapY(p[1]), 3, 0, 2 * Math.PI);
        ctx.fill();
        ctx.stroke();
      }
    }
  });
  items.forEach(({ face, text }, i) => {  // labels last, so no box line crosses one
    const r = labels[i];
    ctx.fillStyle = "rgba(10, 12, 16, 0.78)";
    ctx.fillRect(r.x, r.y, r.w, r.h);
    ctx.fillStyle = !anyPrimary || face.primary === true ? "#f8fafc" : "#e0f2fe";
    ctx.fillText(text, r.x + LABEL_PAD_X, r.y + r.h / 2, r.w - 2 * LABEL_PAD_X);
  });
  return labels.map((r, i) => ({ ...r, text: items[i].text }));
}
