"""GGUF builds: llama.cpp's own converter for every architecture it runs (``convert``,
fetched from the pinned llama-cpp-python source distribution), the quantizer
(``quantize``) and the quality gate against the full model (``gate``)."""
