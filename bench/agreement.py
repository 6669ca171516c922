"""Label agreement of two model folders on the same images (e.g. fp16 vs fp32, static vs dynamic).

    python bench/agreement.py model_fp32 model_fp16
    python bench/agreement.py model_onnx model_static --classes "building,roof;road;tree;water;background"

Both folders segment each image through simfeatup's runtime (the whole pipeline: resize,
windows, averaging, resize back, scoring) with the first folder's query embeddings, so only
the image graphs differ. Images: the bundled samples and, by default, a crop of each wider
than 2:1 (the only images whose windows a static folder pads to 224; docs/model-folder.md).
Prints the share of identical label pixels per image and over all of them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SAMPLES = sorted((ROOT / "samples").glob("*.jpg"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference", type=Path, help="model folder whose labels are the reference")
    p.add_argument("other", type=Path, help="model folder compared with it")
    p.add_argument("--classes", default="building,roof,house;road;tree,forest;water;grass;background")
    p.add_argument("--images", nargs="*", type=Path, default=SAMPLES)
    p.add_argument("--no-wide", action="store_true", help="leave out the crops wider than 2:1")
    args = p.parse_args(argv)

    from simfeatup.imaging import load_image
    from simfeatup.runtime import OnnxSegmenter
    from simfeatup.vocabulary import Vocabulary

    vocab = Vocabulary.from_spec(args.classes)
    ref, other = OnnxSegmenter(args.reference, cache=False), OnnxSegmenter(args.other, cache=False)
    text = ref.encode_queries(vocab.queries)
    cases = []
    for path in args.images:
        image = load_image(path)
        cases.append((path.name, image))
        if not args.no_wide:
            rows = max(16, image.shape[1] * 3 // 10)  # width / height = 3.3: working size ~136 x 448
            cases.append((f"{path.name}[:{rows}] (wider than 2:1)", image[:rows]))
    same = total = 0
    for name, image in cases:
        a, = ref.segment([image], vocab, text=text)
        b, = other.segment([image], vocab, text=text)
        equal = int((a.labels == b.labels).sum())
        same, total = same + equal, total + a.labels.size
        print(f"{name:48s} {100 * equal / a.labels.size:8.3f}% identical labels ({a.labels.size} pixels)")
    print(f"{'all':48s} {100 * same / total:8.3f}% identical labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
