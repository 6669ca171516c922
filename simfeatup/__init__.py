"""simfeatup: training-free open-vocabulary segmentation of remote-sensing images.

SegEarth-OV's dense CLIP features, [CLS] global-bias subtraction and the SimFeatUp
upsampler, with a torch-free ONNX runtime. Heavy modules are imported lazily so that
``simfeatup.runtime`` works without PyTorch installed.
"""

__version__ = "0.1.0"
