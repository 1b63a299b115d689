"""Using a model: ``peftcli generate`` (batched completions of a JSON-lines file) and ``peftcli chat``.

Both load the model as peftcli trained it (``load.py``: base + our adapter, unmerged, so methods that
cannot merge work too) and decode with the one loop of :mod:`peftcli.decoding`.
"""
