"""kubetune: a Kubernetes operator for LLM fine-tuning jobs (QLoRA/LoRA) on GPU pools."""

__version__ = "0.1.0"
