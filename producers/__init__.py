"""Self-chat producers: they write conversation turns as candidate events, apply the
decisions that come back, and publish finished conversations (``service``), with
their state on disk (``state``, ``conversation``) and the generator backends
(``generators``). Imports the kernel (``corpusfactory``) only, no other stage.
"""
