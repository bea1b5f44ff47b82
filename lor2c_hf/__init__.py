"""lor2c-hf: LoR2C (low-rank residual connections) and its variants for Hugging Face transformers."""

from . import console
from .config import METHODS, ConfigError, LoR2CConfig
from .model import Connection, LoR2CModel, get_lor2c_model
from .serialization import AdapterLoadError, load_adapter_model
from .reslora_config import RES_FLAGS, ResLoRAConfig
from .reslora import ResLoRAModel, get_reslora_model
from .methods import get_adapter_model
from .sfs import sfs_scores
from .guards import NonFiniteError
from .plotting import plot_structure  # matplotlib is imported only when a plot is drawn
from .training import CheckpointError, LoR2CCallback, LoR2CTrainer
from .auto import (AutoLoR2CModel, AutoLoR2CModelForCausalLM, AutoLoR2CModelForQuestionAnswering,
                   AutoLoR2CModelForSeq2SeqLM, AutoLoR2CModelForSequenceClassification,
                   AutoLoR2CModelForTokenClassification)

__all__ = [
    "METHODS", "ConfigError", "LoR2CConfig", "Connection", "LoR2CModel", "get_lor2c_model",
    "AdapterLoadError", "sfs_scores", "LoR2CCallback", "LoR2CTrainer",
    "RES_FLAGS", "ResLoRAConfig", "ResLoRAModel", "get_reslora_model", "get_adapter_model", "load_adapter_model",
    "plot_structure", "AutoLoR2CModel", "AutoLoR2CModelForCausalLM", "AutoLoR2CModelForSequenceClassification",
    "AutoLoR2CModelForTokenClassification", "AutoLoR2CModelForQuestionAnswering", "AutoLoR2CModelForSeq2SeqLM",
    "NonFiniteError", "CheckpointError",
]
__version__ = "0.1.0"
console.install()  # event lines through tqdm.write, on their own line
