"""kubetune's trainer: QLoRA/LoRA from data streamed out of S3, with exact resume."""
