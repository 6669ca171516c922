"""Train a SimFeatUp upsampler for a frozen CLIP backbone (SPEC 4), configured by YAML.

    python train/fit.py                                          # quick start: bundled samples, ViT-B/16
    python train/fit.py --config configs/train/simfeatup_vitb16.yaml --data.train_shards 'shards/train-{000000..000099}.tar'
    python train/fit.py --config configs/train/simfeatup_vitb16.yaml --ckpt_path last   # resume
    python train/fit.py --help                                   # every option
"""
import sys
from pathlib import Path

from simfeatup.extras import missing_extra

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "train" / "quickstart.yaml"


def main(argv: list[str] | None = None) -> int:
    try:
        from simfeatup.backbone import BackboneError
        from simfeatup.training.cli import SimFeatUpCLI
    except ModuleNotFoundError as err:
        message = missing_extra(err, "training")
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")
        return 1
    try:
        SimFeatUpCLI(args=argv, parser_kwargs={"default_config_files": [str(QUICKSTART)]}).fit()
    except BackboneError as err:  # unavailable weights, unreadable model config, ...
        sys.stderr.write(f"error: {err}\nHere the backbone is --model.model (an open_clip name or a model config .json) "
                         "and --model.pretrained (a tag or a local weights file).\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
