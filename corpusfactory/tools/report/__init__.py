"""The run report: ``data`` reads what a run left on disk, ``plots`` draws the PNGs,
``html`` renders the page, ``build`` writes them (``corpusfactory report``)."""
