"""Model and tokenizer loading: packaged, pre-trained and randomly initialised Llama models."""

from satrun.models.loading import load_model, load_tokenizer, load_weights, max_sequence_length, weights_folder

__all__ = ["load_model", "load_tokenizer", "load_weights", "max_sequence_length", "weights_folder"]
