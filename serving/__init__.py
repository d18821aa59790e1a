"""Serving snapshots: GGUF builds for llama.cpp, the OpenAI-compatible server, CPU chat."""
