"""Export a SegEarth-OV / SimFeatUp segmenter to a verified ONNX model folder.

    python export/to_onnx.py --upsampler upsampler.safetensors --out model_onnx
    python export/to_onnx.py --upsampler bilinear --model ViT-B-16 --pretrained openai --out model_onnx
    python export/to_onnx.py --help                   # every option

A shim over :func:`simfeatup.export.main.main`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simfeatup.export.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
