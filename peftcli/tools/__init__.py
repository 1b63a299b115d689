"""Commands that read finished (or running) runs: ``peftcli report`` (report.py) and ``peftcli compare``
(compare.py, which also trains one run per method and measures each).

Deliberately empty: import from the module that defines a name.
"""
