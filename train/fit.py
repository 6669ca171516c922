"""Train a SimFeatUp upsampler for a frozen CLIP backbone (SPEC 4), configured by YAML.

python train/fit.py                                          # quick start: bundled samples, ViT-B/16
python train/fit.py --config configs/train/simfeatup_vitb16.yaml --data.train_shards 'shards/train-{000000..000099}.tar'
python train/fit.py --config configs/train/simfeatup_vitb16.yaml --ckpt_path last   # resume
python train/fit.py --help                                   # the options most runs change
python train/fit.py --help-all                               # every option (LightningCLI)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simfeatup.training.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
