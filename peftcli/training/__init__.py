"""Training (``peftcli.training``; named so that it never shadows the public ``peftcli.train()``): the loop
and what only it uses.

    loop.py         the story: set up → restore → per step (window → collate → loss → optimizer step)
                    → log / eval / save → finish
    step.py         one optimizer step (Stepper): forward/backward the window, hooks, clip, update
    loss.py         token losses: plain, fused chunked cross-entropy, body-and-head split
    attention.py    packed (varlen) attention for rows holding several examples
    optim.py        optimizer and learning-rate schedule
    distributed.py  torchrun: DDP, FSDP2, each rank's slice of the window
    rundir.py       the run directory: claim, disk-space check, resume point
    faults.py       non-finite losses and gradients: skip or stop
    metrics.py      the one reader and writer of RUN/metrics.jsonl
    loggers.py      TensorBoard, Weights & Biases, MLflow (fed metrics.jsonl's events)
    console.py      rich output: start summary, progress bar, result tables
    results.py      TrainResult, what `train` returns and writes to results.json

Deliberately empty (like ``peftcli.methods``): import from the module that defines a name.
"""
