#!/usr/bin/env node
'use strict';
// Segment a PNG with a fixed-vocabulary simfeatup model folder, following docs/model-folder-fixed.md:
//
//   node segment.js MODEL_DIR IMAGE.png LABELS.png [--overlay OVERLAY.png]
//
// LABELS.png is 8-bit greyscale, each pixel its class index (classes.json gives the names);
// --overlay also writes the image blended half and half with the classes' colours.

const fs = require('node:fs');
const path = require('node:path');
const ort = require('onnxruntime-node');
const { PNG } = require('pngjs');
const c = require('./contract.js');

const FORMAT = 'simfeatup-onnx';
const VERSION = 3;

function fail(message) {
  process.stderr.write(`segment.js: ${message}\n`);
  process.exit(2);
}

function readManifest(dir) {
  const file = path.join(dir, 'manifest.json');
  if (!fs.existsSync(file)) fail(`${dir} has no manifest.json: not a model folder from export/to_onnx.py`);
  const m = JSON.parse(fs.readFileSync(file, 'utf8'));
  if (m.format !== FORMAT || m.version !== VERSION) {
    fail(`${file}: format ${m.format} version ${m.version}; this consumer reads ${FORMAT} version ${VERSION}`);
  }
  if (!m.vocabulary) fail(`${dir} is not a fixed-vocabulary folder: export it with --classes or --preset`);
  return m;
}

function readRgb(file) {
  let png;
  try {
    png = PNG.sync.read(fs.readFileSync(file));
  } catch (err) {
    fail(`cannot read ${file} as a PNG (${err.message})`);
  }
  const { width, height, data } = png; // RGBA, 8 bits per channel
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) {
    rgb[3 * i] = data[4 * i];
    rgb[3 * i + 1] = data[4 * i + 1];
    rgb[3 * i + 2] = data[4 * i + 2]; // alpha is dropped
  }
  return { rgb, width, height };
}

function writePng(file, width, height, bytes, colorType) {
  const png = new PNG({ width, height, colorType, inputColorType: colorType, bitDepth: 8, inputHasAlpha: false });
  png.data = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  fs.writeFileSync(file, PNG.sync.write(png, { colorType, inputColorType: colorType, inputHasAlpha: false }));
}

async function segment(dir, imageFile) {
  const m = readManifest(dir);
  const pre = m.preprocessing;
  const voc = m.vocabulary;
  const Q = voc.query_class.length;
  const uint8 = m.image_input === 'uint8';
  const options = { executionProviders: ['cpu'] };
  const image = await ort.InferenceSession.create(path.join(dir, m.graphs.image.file), options);
  const scoring = await ort.InferenceSession.create(path.join(dir, m.graphs.scoring.file), options);

  const { rgb, width, height } = readRgb(imageFile);
  if (Math.min(width, height) < pre.patch) fail(`${imageFile} is smaller than one ${pre.patch}-pixel patch`);
  // 1. long side to long_side, OpenCV's uint8 bilinear
  const [h, w] = c.resizedShape(height, width, pre.long_side);
  const resized = c.resizeUint8(rgb, height, width, h, w);
  // 2. windows, one per image-graph call, summed in row-major order, then divided by their count
  const canvas = new Float32Array(Q * h * w);
  const count = new Float32Array(h * w);
  for (const box of c.windowBoxes(h, w, pre.window, pre.stride)) {
    const [y0, y1, x0, x1] = box;
    let feed;
    let win = { H: y1 - y0, W: x1 - x0, top: 0, left: 0 };
    if (uint8) {
      feed = new ort.Tensor('uint8', c.uint8Window(resized, w, box), [1, y1 - y0, x1 - x0, 3]);
    } else {
      win = c.normalisedWindow(resized, w, box, pre.patch, pre.mean, pre.std);
      feed = new ort.Tensor('float32', win.data, [1, 3, win.H, win.W]);
    }
    const { logits } = await image.run({ windows: feed });
    c.addWindow(canvas, count, h, w, logits.data, win.H, win.W, box, win.top, win.left, Q);
  }
  for (let q = 0; q < Q; q++) {
    for (let i = 0; i < h * w; i++) canvas[q * h * w + i] = canvas[q * h * w + i] / count[i];
  }
  // 3. the averaged logits back to the original size, then the scoring graph
  const logits = c.resizeBilinear(canvas, Q, h, w, height, width);
  const out = await scoring.run({ logits: new ort.Tensor('float32', logits, [Q, height, width]) });
  return { labels: out.labels.data, width, height, rgb };
}

async function main(argv) {
  const args = argv.slice(2);
  let overlay = null;
  const at = args.indexOf('--overlay');
  if (at >= 0) {
    overlay = args[at + 1];
    args.splice(at, 2);
  }
  if (args.length !== 3 || !overlay && at >= 0) {
    fail('usage: node segment.js MODEL_DIR IMAGE.png LABELS.png [--overlay OVERLAY.png]');
  }
  const [dir, imageFile, labelsFile] = args;
  const { labels, width, height, rgb } = await segment(dir, imageFile);
  writePng(labelsFile, width, height, labels, 0);
  if (overlay) {
    const { colours } = JSON.parse(fs.readFileSync(path.join(dir, readManifest(dir).vocabulary.file), 'utf8'));
    const blend = new Uint8Array(width * height * 3);
    for (let i = 0; i < width * height; i++) {
      for (let k = 0; k < 3; k++) blend[3 * i + k] = (rgb[3 * i + k] + colours[labels[i]][k] + 1) >> 1;
    }
    writePng(overlay, width, height, blend, 2);
  }
}

if (require.main === module) {
  main(process.argv).catch((err) => fail(err.message.split('\n')[0]));
}

module.exports = { segment };
