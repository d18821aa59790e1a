"""Serving snapshots: GGUF builds for llama.cpp (``builder``, ``gguf``), the model
following (``follow``), the OpenAI-compatible server (``server``) and CPU chat
(``chat``). Imports the kernel and training's snapshot store, no stream code."""
