"""Generator backends behind one interface (``base.Generator``, built by
``factory.make_generator``):
transformers (``hf``), llama.cpp in-process (``llamacpp``), an OpenAI-compatible
server (``openai_compat``) and vLLM in-process (``vllm_engine``). Each imports its
engine lazily, so choosing one never loads the others."""
