"""Training data on ``datasets``: read sources, render formats, tokenize and mask once into a cached,
memory-mapped Arrow table, then sample index batches over its lengths array and collate them.

    sources.py   files/dirs/hub ids -> Arrow, with file-and-line errors
    formats.py   text, completion, instruction, chat, sharegpt, classification: tokens and loss masks
    cache.py     cache keys, atomic entries, memory-mapped reads
    pipeline.py  load_data: the stage the loop and evaluation call; TokenizedRows; mixtures
    sampler.py   BatchSampler: index windows, a pure function of (seed, epoch)
    collate.py   padding a batch of rows into tensors
    preprocess.py  `peftcli preprocess` and `peftcli validate`'s data check
"""

from peftcli.data.collate import collate, collate_rows, pad_token_id
from peftcli.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    FORMAT_COLUMNS,
    IGNORE_INDEX,
    TASK_FORMATS,
    encode_prompt,
    infer_label_names,
    render_instruction,
)
from peftcli.data.pipeline import DataBundle, TokenizedRows, load_data, split_eval
from peftcli.data.sampler import BatchSampler, Mixture
from peftcli.data.sources import FILE_SUFFIXES, load_records, load_source

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "FILE_SUFFIXES",
    "FORMAT_COLUMNS",
    "IGNORE_INDEX",
    "TASK_FORMATS",
    "BatchSampler",
    "DataBundle",
    "Mixture",
    "TokenizedRows",
    "collate",
    "collate_rows",
    "encode_prompt",
    "infer_label_names",
    "load_data",
    "load_records",
    "load_source",
    "pad_token_id",
    "render_instruction",
    "split_eval",
]
