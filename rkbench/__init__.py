"""rkbench: sweep YOLO export / quantization / runtime options for Rockchip NPUs and compare them."""

import os

# rkbench never downloads at run time. Ultralytics would pip-install missing extras (e.g. pi-heif when an
# image does not decode) and probe the network; set before any rkbench module imports it. Users can override.
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_OFFLINE", "true")

__version__ = "0.1.0"
