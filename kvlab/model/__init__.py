"""The model: a Llama-family decoder, its loaders and tokenizer."""
from kvlab.model.config import SMOLLM2_135M, LlamaConfig
from kvlab.model.llama import Llama
from kvlab.model.load import default_model_path, load_model

__all__ = ["Llama", "LlamaConfig", "SMOLLM2_135M", "load_model", "default_model_path"]
