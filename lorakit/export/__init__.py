"""`lorakit export`: what comes after training, serving. GGUF models and LoRA adapters for llama.cpp and Ollama,
and a check that vLLM's LoRA loader accepts an adapter as saved.

Reading order: target (what TARGET is, which architecture) → gguf_vocab (tokenizer metadata) → gguf_model
(weights streamed into a GGUF) → gguf_lora (an adapter as GGUF) → verify (read back by a second reader) →
ollama (a Modelfile) → vllm (the LoRA serving check) → run (the command's steps).

May import lorakit.merge, adapters, models, data, config and the bottom layer (a peer of memory and tools).
"""
