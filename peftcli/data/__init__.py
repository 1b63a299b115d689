"""Training data on ``datasets``: read sources, render formats, tokenize and mask once into a cached,
memory-mapped Arrow table, then sample index batches over its lengths array and collate them.

    sources.py     files/dirs/hub ids -> Arrow, with file-and-line errors
    formats.py     text, completion, instruction, chat, sharegpt, classification: tokens and loss masks
    cache.py       cache keys, atomic entries, memory-mapped reads
    pipeline.py    load_data: the stage the loop and evaluation call; TokenizedRows; mixtures
    sampler.py     BatchSampler: index windows, a pure function of (seed, epoch)
    collate.py     padding a batch of rows into tensors
    progress.py    rich progress bars for datasets' long stages
    preprocess.py  `peftcli preprocess` and `peftcli validate`'s data check

Deliberately empty (like ``peftcli.methods``): import from the module that defines a name, so
importing one module loads only what it needs and the package has no import cycle.
"""
