"""The methods: ``registry`` (the ``Method`` contract), ``catalog`` (the list), one file per method.

Deliberately empty: importing one method module (or the registry) loads only what that module imports.
"""
