"""monoscope: learn, browse and steer sparse-autoencoder features of any Hugging Face causal LM."""

__version__ = "0.1.0"
