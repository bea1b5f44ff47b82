"""Test-wide settings: tiny models gain nothing from intra-op threads, and spinning threads slow a busy CI box."""

import os
import sys
import tempfile

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the recipe and example subprocesses
sys.path.insert(0, os.path.dirname(__file__))  # tests import tiny_models / tiny_pretrained / hub_server directly

# DeepSpeed JIT-builds an op under torch's extensions cache; a killed build leaves a lock there that hangs every
# later run. Each test session builds into its own folder (inherited by the launched processes).
os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="lor2c-torch-extensions-")
