'use strict';
// The pixel rules of a fixed-vocabulary simfeatup model folder, written from docs/model-folder-fixed.md
// alone: the uint8 resize, the windows, the normalisation and padding (float32 folders), the averaging and
// the bilinear resize back of the logits. Pure JavaScript; float32 arithmetic is emulated with Math.fround
// (a double operation on float32 values rounded once to float32 is the float32 operation, for + - * /).

const f32 = Math.fround;
const COEF_ONE = 2048; // OpenCV INTER_LINEAR: 11-bit fixed-point weights

function rintEven(x) {
  // round half to even, for x >= 0
  const lo = Math.floor(x);
  const d = x - lo;
  if (d > 0.5) return lo + 1;
  if (d < 0.5) return lo;
  return lo % 2 === 0 ? lo : lo + 1;
}

/** Long side to `longSide`: [h, w] = trunc(H s + 0.5), trunc(W s + 0.5), s = longSide / max(H, W). */
function resizedShape(height, width, longSide) {
  const s = longSide / Math.max(height, width);
  return [Math.trunc(height * s + 0.5), Math.trunc(width * s + 0.5)];
}

/** The two source taps and fixed-point weights of each output index along one axis. */
function taps(src, dst, rows) {
  const scale = 1.0 / (dst / src);
  const first = new Int32Array(dst);
  const second = new Int32Array(dst);
  const wFirst = new Int32Array(dst);
  const wSecond = new Int32Array(dst);
  for (let d = 0; d < dst; d++) {
    const pos = f32((d + 0.5) * scale - 0.5);
    const start = Math.floor(pos);
    let frac = f32(pos - start);
    if (!rows && (start < 0 || start >= src - 1)) frac = 0; // columns past the border: the border pixel whole
    let a = Math.min(Math.max(start, 0), src - 1);
    let b = Math.min(Math.max(start + 1, 0), src - 1);
    const wa = rintEven(f32(f32(1 - frac) * COEF_ONE));
    const wb = rintEven(f32(frac * COEF_ONE));
    if (wb === 0) b = a;
    if (wa === 0) a = b;
    first[d] = a;
    second[d] = b;
    wFirst[d] = wa;
    wSecond[d] = wb;
  }
  return { first, second, wFirst, wSecond };
}

/** RGB uint8 (H, W, 3) -> (h, w, 3) exactly as cv2.resize(INTER_LINEAR) (docs/model-folder-fixed.md, resize). */
function resizeUint8(rgb, height, width, outH, outW) {
  if (outH === height && outW === width) return rgb;
  const rt = taps(height, outH, true);
  const ct = taps(width, outW, false);
  // horizontal pass of every source row, shifted right by 4
  const horizontal = new Int32Array(height * outW * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < outW; x++) {
      const a = (y * width + ct.first[x]) * 3;
      const b = (y * width + ct.second[x]) * 3;
      for (let c = 0; c < 3; c++) {
        horizontal[(y * outW + x) * 3 + c] = (rgb[a + c] * ct.wFirst[x] + rgb[b + c] * ct.wSecond[x]) >> 4;
      }
    }
  }
  const out = new Uint8Array(outH * outW * 3);
  for (let y = 0; y < outH; y++) {
    const r0 = rt.first[y] * outW * 3;
    const r1 = rt.second[y] * outW * 3;
    const w0 = rt.wFirst[y];
    const w1 = rt.wSecond[y];
    for (let i = 0; i < outW * 3; i++) {
      const top = (horizontal[r0 + i] * w0) >> 16;
      const bottom = (horizontal[r1 + i] * w1) >> 16;
      const v = (top + bottom + 2) >> 2;
      out[y * outW * 3 + i] = v < 0 ? 0 : v > 255 ? 255 : v;
    }
  }
  return out;
}

/** Window starts along one axis: 0, stride, ...; the last window shifted back to end at the border. */
function windowStarts(length, window, stride) {
  const count = Math.floor(Math.max(length - window + stride - 1, 0) / stride) + 1;
  const starts = [];
  for (let i = 0; i < count; i++) {
    const end = Math.min(i * stride + window, length);
    starts.push(Math.max(end - window, 0));
  }
  return starts;
}

/** Every window [y0, y1, x0, x1] in row-major order (the order their logits are summed in). */
function windowBoxes(height, width, window, stride) {
  const boxes = [];
  for (const y0 of windowStarts(height, window, stride)) {
    for (const x0 of windowStarts(width, window, stride)) {
      boxes.push([y0, Math.min(y0 + window, height), x0, Math.min(x0 + window, width)]);
    }
  }
  return boxes;
}

/** [before, after] zero padding of a side up to the next multiple; before = total // 2. */
function padding(size, multiple) {
  const total = (multiple - (size % multiple)) % multiple;
  const before = Math.floor(total / 2);
  return [before, total - before];
}

/** float32 folders: one window of the resized image, normalised and zero-padded -> (3, H, W) Float32Array. */
function normalisedWindow(rgb, width, box, patch, mean, std) {
  const [y0, y1, x0, x1] = box;
  const [top, bottom] = padding(y1 - y0, patch);
  const [left, right] = padding(x1 - x0, patch);
  const H = y1 - y0 + top + bottom;
  const W = x1 - x0 + left + right;
  const out = new Float32Array(3 * H * W); // zeros: the padding (the mean colour after normalisation)
  const m = mean.map(f32);
  const s = std.map(f32);
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      for (let c = 0; c < 3; c++) {
        const v = f32(f32(f32(rgb[(y * width + x) * 3 + c] / 255) - m[c]) / s[c]);
        out[(c * H + (y - y0 + top)) * W + (x - x0 + left)] = v;
      }
    }
  }
  return { data: out, H, W, top, left };
}

/** uint8 folders: one window of the resized image, unpadded -> (h, w, 3) Uint8Array. */
function uint8Window(rgb, width, box) {
  const [y0, y1, x0, x1] = box;
  const w = x1 - x0;
  const out = new Uint8Array((y1 - y0) * w * 3);
  for (let y = y0; y < y1; y++) {
    out.set(rgb.subarray((y * width + x0) * 3, (y * width + x1) * 3), (y - y0) * w * 3);
  }
  return out;
}

/** Add one window's logits (Q, lh, lw) from offset (top, left) into canvas (Q, h, w) at its box; count it. */
function addWindow(canvas, count, h, w, logits, lh, lw, box, top, left, Q) {
  const [y0, y1, x0, x1] = box;
  for (let q = 0; q < Q; q++) {
    for (let y = y0; y < y1; y++) {
      const src = (q * lh + (y - y0 + top)) * lw + left - x0;
      const dst = (q * h + y) * w;
      for (let x = x0; x < x1; x++) canvas[dst + x] += logits[src + x]; // Float32Array: rounds to float32
    }
  }
  for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) count[y * w + x] += 1;
}

/** Bilinear resize of (C, h, w) float32 to (C, H, W): align_corners false, no antialias, float32 arithmetic. */
function resizeBilinear(x, C, h, w, H, W) {
  let out = x;
  let rows = h;
  let cols = w;
  for (const [axis, size] of [[1, H], [2, W]]) {
    const old = axis === 1 ? rows : cols;
    if (size === old) continue;
    const scale = f32(old / size);
    const i0 = new Int32Array(size);
    const i1 = new Int32Array(size);
    const fa = new Float32Array(size);
    const fb = new Float32Array(size);
    for (let d = 0; d < size; d++) {
      const src = Math.max(f32((d + 0.5) * scale - 0.5), 0);
      const a = Math.min(Math.floor(src), old - 1);
      i0[d] = a;
      i1[d] = Math.min(a + 1, old - 1);
      fb[d] = f32(src - a);
      fa[d] = f32(1 - fb[d]);
    }
    const nr = axis === 1 ? size : rows;
    const nc = axis === 2 ? size : cols;
    const next = new Float32Array(C * nr * nc);
    for (let c = 0; c < C; c++) {
      for (let r = 0; r < nr; r++) {
        for (let k = 0; k < nc; k++) {
          let p;
          let q;
          let d;
          if (axis === 1) {
            p = out[(c * rows + i0[r]) * cols + k];
            q = out[(c * rows + i1[r]) * cols + k];
            d = r;
          } else {
            p = out[(c * rows + r) * cols + i0[k]];
            q = out[(c * rows + r) * cols + i1[k]];
            d = k;
          }
          next[(c * nr + r) * nc + k] = f32(f32(p * fa[d]) + f32(q * fb[d]));
        }
      }
    }
    out = next;
    rows = nr;
    cols = nc;
  }
  return out;
}

module.exports = {
  resizedShape, taps, resizeUint8, windowStarts, windowBoxes, padding, normalisedWindow, uint8Window,
  addWindow, resizeBilinear,
};
