"""Reading checkpoints: Hugging Face safetensors directories and GGUF files."""
